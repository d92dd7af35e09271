"""Training recipes, each a :class:`pipeline.train.method.Method`; ``pipeline.build`` turns config into them."""

from pipeline.train.methods.cbd import CBD
from pipeline.train.methods.decoupled import Decoupled
from pipeline.train.methods.deit_lt import DeiTLT
from pipeline.train.methods.erm import ERM
from pipeline.train.methods.paco import PaCo
from pipeline.train.methods.rac import RAC

__all__ = ["CBD", "Decoupled", "DeiTLT", "ERM", "PaCo", "RAC"]
