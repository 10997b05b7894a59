"""One child process of the interop memory check: segmentation-models-pytorch's DeepLabV3Plus(resnet50),
stock (its C-channel segmentation head) or with scaleseg's ESS head in place of it, trained for a few
steps at C classes; prints {"peak_rss_mb": ...} (the process's peak resident set size) as JSON."""

import json
import resource
import sys

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

import scaleseg

variant, num_classes, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(2)
model = smp.DeepLabV3Plus("resnet50", encoder_weights=None, classes=num_classes)
if variant == "ess":
    head = scaleseg.ESSHead(model.segmentation_head[0].in_channels, num_classes, 12)
    model.segmentation_head = head
    params = [{"params": list(model.encoder.parameters()) + list(model.decoder.parameters())}, *head.param_groups(0.01)]
else:
    params = model.parameters()
optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
images = torch.randn(2, 3, size, size)
labels = torch.randint(0, num_classes, (2, size, size))
for _ in range(2):  # the second step holds the momentum buffers too
    out = model(images)
    loss = head.loss(out, labels)["loss"] if variant == "ess" else F.cross_entropy(out, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(json.dumps({"variant": variant, "num_classes": num_classes, "loss": float(loss),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
