"""Without a loadable resnet_fused._C, the package still imports, warns once, and the "torch" backend serves."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "resnet_fused._C":
                raise ImportError("simulated: undefined symbol from a mismatched torch")
            return None

    sys.meta_path.insert(0, BlockExtension())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import resnet_fused as rf
        from resnet_fused import _extension
        _extension.load()
        rf.available_backends("cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "resnet_fused._C failed to load" in messages[0] and "'torch' serves" in messages[0], messages[0]
    reasons = rf.available_backends("cpu")
    assert reasons["torch"] is None
    assert "simulated: undefined symbol" in reasons["cpu"], reasons
    assert rf.ops.resolve_name("auto", "cpu") == "torch"
    x = torch.randn(1, 4, 6, 6)
    y = rf.conv_bn_act(x, torch.randn(8, 4, 3, 3), torch.ones(8), torch.zeros(8), padding=1)
    assert y.shape == (1, 8, 6, 6)
    print("OK")
""")


def test_import_without_extension_warns_once_and_falls_back_to_torch():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("OK")
