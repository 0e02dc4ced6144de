"""Python code for a fresh interpreter in which importing PyTorch fails: how the tests prove that a path of
dogkit (ONNX evaluation, predict, bench, serve, the deploy package) never needs it."""

NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name.startswith("torchvision"):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _NoTorch())
"""

# `python -c CLI_WITHOUT_TORCH ARGS…` runs `dogkit ARGS…`.
CLI_WITHOUT_TORCH = NO_TORCH + """
from dogkit.cli import main
sys.argv = ["dogkit"] + sys.argv[1:]
main()
"""
