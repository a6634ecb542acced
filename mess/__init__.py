"""MESS: store a CNN in a fraction of its bits by kernel sharing, each kernel ``alpha * bank[k] + beta``.

    import mess
    c = mess.compress(model, "v2qq", qb=4)     # any nn.Module with 3x3 / 1x1 convs (or linears, fc=True)
    c = mess.compress(model, "v2qq", bank="learned", bank_size=512, qba=4, qbb=4)   # a learned bank
    model.load_state_dict(c.state_dict)        # the compressed network
    mess.calibrate_bn(model, images, reference=float_model)   # its BatchNorm statistics (§8)
    print(mess.account(c).ratio)               # whole-model compression ratio (docs/design.md §5)
    mess.save(c, "model.mess")                 # the packed file, that many bits on disk
    c = mess.load("model.mess", model)         # validated; the weights are loaded into model
    mess.parametrize(model, c.entry)           # retrain in MESS form in your own loop...
    c = mess.export(model)                     # ...and get a Compressed back, exactly representable

The CLIs of the repository (main.py, find_similar_kernel.py, quantize.py, packed.py, ...) are thin
shells over this package; the design is in docs/design.md.
"""
from __future__ import annotations

import torch.nn as nn

from .account import Account, storage_account
from .bn import calibrate_bn
from .checkpoint import load_checkpoint, load_state_dict_checked
from .compress import Compressed, compress
from .entry import Entry, NotRepresentable, check_representable
from .errors import UserError
from .packed_format import SUFFIX
from .packed_read import read_mess
from .packed_write import write_mess
from .palette import palettize
from .parametrize import export_entry, parametrize, plain_state_dict
from .search import search
from .settings import VERSIONS, Settings

__all__ = ["VERSIONS", "Account", "Compressed", "Entry", "NotRepresentable", "Settings", "UserError",
           "account", "calibrate_bn", "compress", "export", "load", "palettize", "parametrize", "save",
           "search", "validate"]


def account(c: Compressed | dict, entry: Entry | dict | None = None, quant: dict | None = None,
            palette: dict | None = None) -> Account:
    """The storage account of a ``Compressed`` (or of a state_dict with its entry, or with a ``quant``
    entry of plain quantization): bits stored against float32, per tensor and in total."""
    if isinstance(c, Compressed):
        return storage_account(c.state_dict, c.entry)
    return storage_account(c, entry, quant, palette)


def save(c: Compressed | dict, path) -> int:
    """Write ``c`` (a ``Compressed`` or a checkpoint dict) as a packed ``.mess`` file, atomically;
    returns its size in bytes. A state that is not exactly what its entry describes is refused."""
    ckpt = c.checkpoint() if isinstance(c, Compressed) else c
    return write_mess(path, ckpt)


def load(path, model: nn.Module | None = None) -> Compressed:
    """Read a ``.mess`` file (or a ``.pth`` checkpoint) and, given ``model``, load its weights into it
    (every key and shape checked). The architecture comes from the caller: the file holds weights."""
    ckpt = read_mess(path, model=model) if str(path).endswith(SUFFIX) else load_checkpoint(path)
    if model is not None:
        load_state_dict_checked(model, ckpt["model"], path)
    entry = Entry.from_dict(ckpt["mess"]) if ckpt.get("mess") else None
    return Compressed(ckpt["model"], entry, [], ckpt.get("arch"))


def export(model: nn.Module, entry: Entry | dict | None = None) -> Compressed:
    """A model parametrized by ``parametrize`` back as a ``Compressed``: plain weights (each covered
    one computed by its parametrization) and the current entry, checked to be exactly representable."""
    e = export_entry(model, entry)
    c = Compressed(plain_state_dict(model), e, [])
    e.check(c.state_dict)
    return c


def validate(c: Compressed | dict) -> None:
    """Raise ``NotRepresentable`` unless ``c`` (a ``Compressed`` or a checkpoint dict) holds exactly what
    its entry describes (docs/design.md §4)."""
    check_representable(c.checkpoint() if isinstance(c, Compressed) else c)

