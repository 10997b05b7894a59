from scaleseg.models.decoders.deeplabv3plus import DeepLabV3PlusDecoder, default_aspp_dilations
from scaleseg.models.decoders.fusion import HRNetFusionDecoder

__all__ = ["DeepLabV3PlusDecoder", "HRNetFusionDecoder", "default_aspp_dilations"]
