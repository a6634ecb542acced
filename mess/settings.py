"""MESS versions and the settings of one compression (docs/design.md §3).

    >>> from mess.settings import Settings
    >>> s = Settings("v2qq", qb=4)        # weights at 4 bits, alphas and betas at 8
    >>> s.weight_bits, s.alpha_bits, s.beta_bits
    (4, 8, 8)
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import UserError

EPS = 1e-8  # the original's epsilon for the eps variants (its file names carry "_eps1e-08")
MIN_BITS, MAX_BITS = 2, 16
BANKS = ("layer", "learned")
GRIDS = ("mse", "minmax")  # mess.grids
MAX_BANK = 2**16


@dataclass(frozen=True)
class Version:
    """What a MESS version does."""
    name: str
    quant_weights: bool = True  # covered layers quantized to --qb before the search
    quant_ab: bool = True  # alphas (--qba) and betas (--qbb) quantized per layer after it
    beta: bool = True  # False: v2nb, alpha = <w, r> / ||r||^2 and no offset
    eps_mode: str | None = None  # "add" (epsv1), "replace" (epsv2), "nan1" (epsv3)
    bind: bool = False  # v2.5: -d input-channel kernels bound into one vector
    transforms: int = 1  # v3: 8, the dihedral group of each 3x3 bank kernel


VERSION_SPECS = {v.name: v for v in (
    Version("v2", quant_weights=False, quant_ab=False),
    Version("v2q", quant_ab=False),
    Version("v2qq"),
    Version("v2qq-epsv1", eps_mode="add"),
    Version("v2qq-epsv2", eps_mode="replace"),
    Version("v2qq-epsv3", eps_mode="nan1"),
    Version("v2f"),  # as v2qq here; retraining keeps its k fixed
    Version("v2nb", beta=False),
    Version("v2.5", bind=True),
    Version("v3", transforms=8),
)}
VERSIONS = tuple(VERSION_SPECS)


def get_version(name: str | None) -> Version:
    if name is None:
        raise UserError(f"-v/--version is required: one of {', '.join(VERSIONS)}")
    if name not in VERSION_SPECS:
        raise UserError(f"unknown version {name!r}; choose from {', '.join(VERSIONS)}")
    return VERSION_SPECS[name]


def check_bits(bits: int, flag: str = "--qb") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{flag} must be between {MIN_BITS} and {MAX_BITS} bits, got {bits}")
    return bits


def index_bits(bank_size: int) -> int:
    """``ceil(log2 N)`` bits address a bank of N vectors (0 for a bank of one)."""
    return (bank_size - 1).bit_length()


@dataclass(frozen=True)
class Settings:
    """Everything one compression is asked to do, validated on construction (``UserError``).

    The names are the CLI flags' (``--qb --qba --qbb -d -pwd --fc``); ``pointwise`` is the
    opposite of ``--np``. A version that does not quantize ignores the bits it does not use:
    ``weight_bits``, ``alpha_bits`` and ``beta_bits`` say what is stored (None: float32).
    """
    version: str
    qb: int = 8  # weights of covered layers, before the search (q versions)
    qba: int = 8  # alphas, after it (qq versions)
    qbb: int = 8  # betas, after it (qq versions with beta)
    bind_size: int = 2  # -d: v2.5's input-channel kernels per vector
    pw_bind_size: int = 8  # -pwd: the pointwise path's vector length
    pointwise: bool = True  # False: --np, no pointwise path
    fc: bool = False  # --fc: fully connected layers join the pointwise path
    bank: str = "layer"  # --bank: "layer" (the bank layer's own vectors, the original) | "learned"
    bank_size: int = 256  # --bank-size: rows of a learned bank (before v3's 8 transforms)
    grid: str = "mse"  # --grid: alpha/beta (and learned bank) grid, "mse" | "minmax" (the original's)

    def __post_init__(self):
        get_version(self.version)
        if self.bank not in BANKS:
            raise UserError(f"--bank must be one of {', '.join(BANKS)}, got {self.bank!r}")
        if self.grid not in GRIDS:
            raise UserError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if isinstance(self.bank_size, bool) or not isinstance(self.bank_size, int) or not (
                1 <= self.bank_size <= MAX_BANK):
            raise UserError(f"--bank-size must be between 1 and {MAX_BANK}, got {self.bank_size}")
        for bits, flag in ((self.qb, "--qb"), (self.qba, "--qba"), (self.qbb, "--qbb")):
            check_bits(bits, flag)
        for n, flag in ((self.bind_size, "-d/--bind-size"), (self.pw_bind_size, "-pwd/--pw-bind-size")):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise UserError(f"{flag} must be at least 1, got {n}")

    @property
    def spec(self) -> Version:
        return VERSION_SPECS[self.version]

    @property
    def bind(self) -> int:
        """The kernel path's bind size: -d for v2.5, else 1."""
        return self.bind_size if self.spec.bind else 1

    @property
    def weight_bits(self) -> int | None:
        return self.qb if self.spec.quant_weights else None

    @property
    def alpha_bits(self) -> int | None:
        return self.qba if self.spec.quant_ab else None

    @property
    def beta_bits(self) -> int | None:
        return self.qbb if self.spec.quant_ab and self.spec.beta else None

    @property
    def learned(self) -> bool:
        return self.bank == "learned"

    @property
    def eps(self) -> float | None:
        return EPS if self.spec.eps_mode else None

    def with_version(self, version: str) -> Settings:
        return replace(self, version=version)

    @classmethod
    def from_args(cls, args, version: str | None = None) -> Settings:
        """The settings of a CLI's parsed flags (``-v``, ``--qb`` ... ``--np``, ``--fc``)."""
        return cls(version or args.version, qb=args.qb, qba=args.qba, qbb=args.qbb, bind_size=args.bind_size,
                   pw_bind_size=args.pw_bind_size, pointwise=not args.np, fc=bool(getattr(args, "fc", False)),
                   bank=getattr(args, "bank", "layer"), bank_size=getattr(args, "bank_size", 256),
                   grid=getattr(args, "grid", "mse"))

    @classmethod
    def from_entry(cls, entry, fallback: Settings) -> Settings:
        """The settings a MESS entry was made with (a retrained checkpoint keeps its structure and bit
        widths); what the entry does not record (bits of a float part) comes from ``fallback``."""
        kw = {f.name: getattr(fallback, f.name) for f in fields(cls)}
        kw.update(version=entry.version, qb=entry.weight_bits or fallback.qb,
                  qba=entry.alpha_bits or fallback.qba, qbb=entry.beta_bits or fallback.qbb,
                  pointwise=entry.pointwise is not None, fc=entry.fc, grid=entry.grid)
        learned = [p for p in entry.paths() if p.learned is not None]
        if learned:
            kw.update(bank="learned", bank_size=learned[0].learned.shape[0])
        if entry.kernel is not None and VERSION_SPECS[entry.version].bind:
            kw["bind_size"] = entry.kernel.bind
        if entry.pointwise is not None:
            kw["pw_bind_size"] = entry.pointwise.bind
        return cls(**kw)
