from scaleseg.models.decoders.deeplabv3plus import DeepLabV3PlusDecoder, default_aspp_dilations

__all__ = ["DeepLabV3PlusDecoder", "default_aspp_dilations"]
