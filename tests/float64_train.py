"""`moiie train` with every parameter in float64 (a helper of tests/test_train_parallel.py).

Run as ``python tests/float64_train.py train CONFIG.yaml --out DIR`` or under ``torchrun``. In
float64 the rounding differences between one process and several ranks stay near 1e-15 instead
of 1e-7, so two runs can be compared over many steps before chaotic training amplifies them.
"""

import sys

from moiie.cli import main
from moiie.model import MoIIEForCausalLM

_from_config = MoIIEForCausalLM.from_config.__func__
_upcycle = MoIIEForCausalLM.upcycle


def _double_from_config(cls, config):
    return _from_config(cls, config).double()


def _double_upcycle(self, *args, **kwargs):
    _upcycle(self, *args, **kwargs)
    self.double()


if __name__ == "__main__":
    MoIIEForCausalLM.from_config = classmethod(_double_from_config)
    MoIIEForCausalLM.upcycle = _double_upcycle
    sys.exit(main(sys.argv[1:]))
