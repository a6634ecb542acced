"""The ``mess`` entry of a checkpoint, typed: what each covered layer is made of (docs/design.md §4).

    >>> from mess.entry import Entry
    >>> entry = Entry.from_dict(ckpt["mess"])     # validated; the checkpoint's own dict stays as it is
    >>> for path in entry.paths(): ...            # the kernel path, then the pointwise path
    >>> entry.check(ckpt["model"])               # raises NotRepresentable unless the weights are exact
    >>> ckpt["mess"] = entry.to_dict()            # plain dicts and tensors: torch.load(weights_only=True)

On disk the entry stays the nested dict of the checkpoint contract (so every checkpoint already
written keeps loading); in memory every tool works on these types, built here and validated in one
place, ``Entry.from_dict``.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from .errors import UserError
from .layers import bank_vectors, dihedral, put_vectors, reconstruct, target_vectors
from .quant import on_grid
from .settings import GRIDS, VERSION_SPECS, Version, check_bits, index_bits

KINDS = ("kernel", "pointwise")
_ENTRY_KEYS = ("version", "weight_bits", "alpha_bits", "beta_bits", "eps", "fc")


class NotRepresentable(ValueError):
    """A checkpoint that does not hold what its ``mess`` or ``quant`` entry claims."""


@dataclass
class LayerCode:
    """One covered layer: per target vector an index into the bank, a slope and an offset."""
    k: torch.Tensor  # int64 (M,)
    alpha: torch.Tensor  # float32 (M,)
    beta: torch.Tensor | None  # float32 (M,); None without beta (v2nb)
    alpha_scale: float | None = None  # the grid of alpha when quantized
    beta_scale: float | None = None
    weight_scale: float | None = None  # the target's own pre-search grid (q versions); not needed to decode

    def to_dict(self) -> dict:
        d = {"k": self.k, "alpha": self.alpha}
        if self.beta is not None:
            d["beta"] = self.beta
        d.update(alpha_scale=self.alpha_scale, beta_scale=self.beta_scale, weight_scale=self.weight_scale)
        return d

    @classmethod
    def from_dict(cls, d, where: str) -> LayerCode:
        if not isinstance(d, dict):
            raise UserError(f"{where}: not a layer entry")
        k, alpha, beta = d.get("k"), d.get("alpha"), d.get("beta")
        if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or k.dim() != 1:
            raise UserError(f"{where}: k must be a 1-D int64 tensor")
        for name, x in (("alpha", alpha), ("beta", beta)):
            if (x is not None or name == "alpha") and not (
                    isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == k.shape):
                raise UserError(f"{where}: {name} must be a float32 tensor of k's shape {tuple(k.shape)}")
        scales = [d.get(s) for s in ("alpha_scale", "beta_scale", "weight_scale")]
        if any(s is not None and not isinstance(s, (int, float)) for s in scales):
            raise UserError(f"{where}: a scale is not a number")
        return cls(k, alpha, beta, *(None if s is None else float(s) for s in scales))


@dataclass
class PathEntry:
    """One path (kernel 3x3 or pointwise 1x1/FC): its bank layer and the layers fitted to it."""
    kind: str  # kernel | pointwise
    bank: str  # module name of the bank layer
    bind: int  # vector binding: v2.5's -d (kernel), -pwd (pointwise), else 1
    transforms: int  # 8: v3's dihedral group of each bank kernel
    vector_length: int
    bank_size: int
    bank_scale: float | None = None  # the bank weight's grid when quantized
    layers: dict[str, LayerCode] = field(default_factory=dict)
    learned: torch.Tensor | None = None  # float32 (rows, vector_length): a learned bank (--bank learned)
    learned_scale: float | None = None  # its grid at weight_bits; the bank layer keeps bank_scale

    @property
    def index_bits(self) -> int:
        return index_bits(self.bank_size)

    def to_dict(self) -> dict:
        return {"bank": self.bank, "kind": self.kind, "bind": self.bind, "transforms": self.transforms,
                "vector_length": self.vector_length, "bank_size": self.bank_size,
                "index_bits": self.index_bits, "bank_scale": self.bank_scale,
                "layers": {t: code.to_dict() for t, code in self.layers.items()},
                **({"learned": self.learned, "learned_scale": self.learned_scale}
                   if self.learned is not None else {})}

    @classmethod
    def from_dict(cls, d, kind: str) -> PathEntry:
        if not (isinstance(d, dict) and isinstance(d.get("bank"), str) and isinstance(d.get("layers"), dict)):
            raise UserError(f"the {kind} path of the MESS entry has no bank or no layers")
        ints = {}
        for key in ("bind", "transforms", "vector_length", "bank_size"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"the {kind} path's {key} must be a positive integer, got {v!r:.40}")
            ints[key] = v
        if d.get("kind", kind) != kind:
            raise UserError(f"the {kind} path says it is a {d.get('kind')!r:.20} path")
        scale = d.get("bank_scale")
        if scale is not None and not isinstance(scale, (int, float)):
            raise UserError(f"the {kind} path's bank scale is not a number")
        layers = {t: LayerCode.from_dict(e, f"{kind} target {t}") for t, e in d["layers"].items()}
        learned, lscale = d.get("learned"), d.get("learned_scale")
        if learned is not None:
            rows = ints["bank_size"] // ints["transforms"]
            if not (isinstance(learned, torch.Tensor) and learned.dtype == torch.float32
                    and tuple(learned.shape) == (rows, ints["vector_length"])
                    and rows * ints["transforms"] == ints["bank_size"]):
                raise UserError(f"the {kind} path's learned bank must be a float32 tensor of shape "
                                f"{(rows, ints['vector_length'])}")
            if lscale is not None and not isinstance(lscale, (int, float)):
                raise UserError(f"the {kind} path's learned bank scale is not a number")
        return cls(kind, d["bank"], **ints, bank_scale=None if scale is None else float(scale), layers=layers,
                   learned=learned, learned_scale=None if lscale is None else float(lscale))

    def bank_vectors(self, state_dict: dict) -> torch.Tensor:
        """The bank rows: the learned bank's (with v3's transforms), else the bank layer's vectors."""
        if self.learned is not None:
            return dihedral(self.learned) if self.transforms == 8 else self.learned
        return bank_vectors(state_dict[f"{self.bank}.weight"], self.kind, self.bind, self.transforms)


@dataclass
class Entry:
    """A whole MESS entry: the version, the bits of what is quantized, and the two paths."""
    version: str
    weight_bits: int | None  # the bank (and, before the search, every covered layer); None: float32
    alpha_bits: int | None
    beta_bits: int | None
    eps: float | None = None  # the eps variants' epsilon
    fc: bool = False  # --fc: FC layers on the pointwise path
    kernel: PathEntry | None = None
    pointwise: PathEntry | None = None
    args: dict | None = None  # the flags of the command that made it; None: not recorded
    grid: str = "minmax"  # alpha/beta/learned-bank grid (mess.grids); entries without one used minmax

    @property
    def spec(self) -> Version:
        return VERSION_SPECS[self.version]

    def paths(self) -> Iterator[PathEntry]:
        """The paths present, kernel first: the one walk every tool makes."""
        return (p for p in (self.kernel, self.pointwise) if p is not None)

    def targets(self) -> Iterator[tuple[PathEntry, str, LayerCode]]:
        """Every covered target layer with its path, in path then layer order."""
        return ((p, t, code) for p in self.paths() for t, code in p.layers.items())

    def covered(self) -> list[str]:
        """Every layer whose weight the entry determines: each path's bank, then its targets."""
        return [n for p in self.paths() for n in (p.bank, *p.layers)]

    def replace(self, **changes) -> Entry:
        return replace(self, **changes)

    # ---- the checkpoint's dict
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _ENTRY_KEYS}
        d["kernel"] = self.kernel.to_dict() if self.kernel else None
        d["pointwise"] = self.pointwise.to_dict() if self.pointwise else None
        if self.args is not None:
            d["args"] = dict(self.args)
        d["grid"] = self.grid
        return d

    @classmethod
    def from_dict(cls, d) -> Entry:
        """The entry of a checkpoint dict, validated: version, bits, paths, every layer's tensors.

        Shapes against a state_dict are ``check``'s; this checks what the entry says on its own."""
        if isinstance(d, Entry):
            return d
        if not isinstance(d, dict) or d.get("version") not in VERSION_SPECS:
            version = d.get("version") if isinstance(d, dict) else d
            raise UserError(f"unknown MESS version {version!r:.40}")
        spec = VERSION_SPECS[d["version"]]
        bits = {}
        for key, used in (("weight_bits", spec.quant_weights), ("alpha_bits", spec.quant_ab),
                          ("beta_bits", spec.quant_ab and spec.beta)):
            b = d.get(key)
            if used and b is not None:
                check_bits(b, key.replace("_", " "))
            elif not used and b is not None:
                raise UserError(f"{spec.name} stores no {key.replace('_', ' ')}")
            bits[key] = b
        eps = d.get("eps")
        if eps is not None and not isinstance(eps, float):
            raise UserError(f"the MESS entry's eps is not a number: {eps!r:.40}")
        args = d.get("args")
        if args is not None and not isinstance(args, dict):
            raise UserError("the MESS entry's args are not a dict")
        grid = d.get("grid", "minmax")
        if grid not in GRIDS:
            raise UserError(f"the MESS entry's grid is not one of {', '.join(GRIDS)}: {grid!r:.40}")
        paths = {kind: None if d.get(kind) is None else PathEntry.from_dict(d[kind], kind) for kind in KINDS}
        if paths["kernel"] is None and paths["pointwise"] is None:
            raise UserError("a MESS entry without any path")
        return cls(spec.name, **bits, eps=eps, fc=bool(d.get("fc", False)), **paths, args=args, grid=grid)

    # ---- against a state_dict
    def reconstruct(self, state_dict: dict) -> dict:
        """``state_dict`` with every covered target weight rebuilt as ``alpha * bank[k] + beta``."""
        out = dict(state_dict)
        for p in self.paths():
            B = p.bank_vectors(state_dict)
            for t, code in p.layers.items():
                vec = reconstruct(B, code.k, code.alpha, code.beta)
                out[f"{t}.weight"] = put_vectors(state_dict[f"{t}.weight"], vec, p.kind, p.bind)
        return out

    def check(self, state_dict: dict) -> None:
        """Raise ``NotRepresentable`` unless ``state_dict`` is what this entry describes, bit for bit:
        banks of the declared size on their grids, k in range, alpha and beta on their grids, and
        every covered target weight equal to ``alpha * bank[k] + beta`` (docs/design.md §4)."""
        for p in self.paths():
            key = f"{p.bank}.weight"
            if key not in state_dict:
                raise NotRepresentable(f"bank {p.bank} has no weight in the state_dict")
            if self.weight_bits:
                _grid(state_dict[key], p.bank_scale, self.weight_bits, f"bank {p.bank}")
                if p.learned is not None:
                    _grid(p.learned, p.learned_scale, self.weight_bits, f"learned bank of the {p.kind} path")
            B = p.bank_vectors(state_dict)
            if tuple(B.shape) != (p.bank_size, p.vector_length):
                raise NotRepresentable(f"bank {p.bank}: {tuple(B.shape)} vectors, entry says "
                                       f"{(p.bank_size, p.vector_length)}")
            for t, code in p.layers.items():
                self._check_target(p, t, code, B, state_dict)

    def _check_target(self, p: PathEntry, t: str, code: LayerCode, B: torch.Tensor, state_dict: dict) -> None:
        if f"{t}.weight" not in state_dict:
            raise NotRepresentable(f"{t} has no weight in the state_dict")
        W = target_vectors(state_dict[f"{t}.weight"], p.kind, p.bind)
        if code.k.shape != (W.shape[0],):
            raise NotRepresentable(f"{t}: {W.shape[0]} vectors but {tuple(code.k.shape)} indices")
        if code.k.numel() and (code.k.min() < 0 or code.k.max() >= B.shape[0]):
            raise NotRepresentable(f"{t}: k outside the bank of {B.shape[0]}")
        if (code.beta is not None) != self.spec.beta:
            what = "missing" if self.spec.beta else "present"
            raise NotRepresentable(f"{t}: beta {what} in {self.version}")
        if self.alpha_bits:
            _grid(code.alpha, code.alpha_scale, self.alpha_bits, f"{t} alpha")
        if code.beta is not None and self.beta_bits:
            _grid(code.beta, code.beta_scale, self.beta_bits, f"{t} beta")
        vec = reconstruct(B, code.k, code.alpha, code.beta)
        if not torch.equal(vec, W):
            raise NotRepresentable(f"{t}: weight differs from alpha * bank[k] + beta by up to "
                                   f"{(vec - W).abs().max().item():.3g}")


def _grid(x: torch.Tensor, scale, bits: int, what: str) -> None:
    why = on_grid(x, scale, bits)
    if why:
        raise NotRepresentable(f"{what}: {why}")


def check_representable(ckpt: dict) -> None:
    """Raise ``NotRepresentable`` unless ``ckpt`` satisfies docs/design.md §4: a plain unwrapped
    state_dict; in a MESS checkpoint every covered weight exactly what its entry rebuilds
    (``Entry.check``); in a plain quantized checkpoint (``quant``) every listed weight on its grid."""
    sd = ckpt["model"]
    bad = [k for k in sd if "parametrizations." in k or k.startswith(("module.", "_orig_mod."))]
    if bad:
        raise NotRepresentable(f"state_dict is not plain: {bad[0]}")
    if ckpt.get("mess"):
        try:
            entry = Entry.from_dict(ckpt["mess"])
        except UserError as e:
            raise NotRepresentable(str(e)) from None
        entry.check(sd)
    if ckpt.get("palette"):
        from .palette import Palette, PaletteError
        try:
            Palette.from_dict(ckpt["palette"]).check(sd)
        except (UserError, PaletteError) as e:
            raise NotRepresentable(str(e)) from None
    quant = ckpt.get("quant")
    if quant:
        for name, scale in quant["scales"].items():
            _grid(sd[f"{name}.weight"], scale, quant["bits"], f"{name}.weight")
