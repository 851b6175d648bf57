"""Importing PEFT prints two known, harmless dependency warnings; `expert` drops those two only."""

import logging

import expert  # noqa: F401  (installs the filter)


def test_known_import_warnings_are_dropped_and_every_other_is_kept(caplog):
    caplog.set_level(logging.DEBUG)
    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    intmm = logging.getLogger("torchao.kernel.intmm")
    # As torchao 0.18 and torch 2.13 word them.
    torchao.warning("Failed to load %s: %s", "/venv/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so",
                    "Could not load this library")
    torchao.warning("Failed to load the model config")
    torchao.warning("Skipping import of cpp extensions due to incompatible torch version")
    pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque "
                   "value type.", "<enum 'KernelPreference'>")
    pytree.warning("register_pytree_node is deprecated")
    intmm.warning("Warning: Detected no triton, on systems without Triton certain kernels will not work")
    intmm.warning("int8 matmul fell back")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load the model config", "Skipping import of cpp extensions due to incompatible torch version",
        "register_pytree_node is deprecated", "int8 matmul fell back"]
