"""The node's static configuration: regions, insurance types, policies, institutions, terminals,
limits. msgspec Structs, so a TOML file or a JSON document decodes straight into them with
errors that name the path and never echo a value.
"""
from typing import Annotated, Literal, Optional

import msgspec


class Band(msgspec.Struct, forbid_unknown_fields=True):
    """One ratio band on the in-scope axis: up to `upper_fen` (None = no upper end)."""
    ratio_bp: int                        # basis points: 8500 = 85%
    upper_fen: Optional[int] = None


class PolicySpec(msgspec.Struct, forbid_unknown_fields=True):
    """参保地政策: what the pooled fund pays for one (region, type, person, visit, level) set."""
    name: str
    region: Optional[int]                # 6-digit region code; None = any region
    ins_type: Optional[int]              # 险种 code (310 employee ...); None = any
    person_type: Literal["in_service", "retired", "any"]
    visit_types: list[int]               # 11 outpatient, 14 chronic, 21 inpatient, 41 pharmacy
    levels: list[int] = []               # hospital levels 1..3; empty = any (and level 0)
    deductible_first_fen: int = 0
    deductible_later_fen: int = 0
    per_admission: bool = False          # False: the deductible is consumed per year, cumulatively
    bands: list[Band] = []
    cap_fen: int = 0
    fund_pays: bool = True


class RegionSpec(msgspec.Struct, forbid_unknown_fields=True):
    code: int
    name: str
    temp_loss_days: int = 7              # 临时挂失 lapses after this many days (7–15)


class InsTypeSpec(msgspec.Struct, forbid_unknown_fields=True):
    code: int
    name: str


class InstitutionSpec(msgspec.Struct, forbid_unknown_fields=True):
    code: str                            # field 42, 15 characters
    kind: Literal["hospital", "pharmacy", "bank", "merchant"]
    region: int
    level: int = 0                       # hospital level 1..3; 0 for others


class TerminalSpec(msgspec.Struct, forbid_unknown_fields=True):
    terminal_id: str                     # field 41, 8 characters
    institution: str                     # field 42 code
    mac_algorithm: Literal["x9.19", "cups-ecb"] = "x9.19"
    # The terminal master key is not configuration: it lives encrypted under the node master key
    # in the data directory's keys.json (protocols/keystore.py).


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    """Per-transaction amount limits (61 above them); 0 = none."""
    purchase_fen_max: int = 0
    withdrawal_fen_max: int = 0
    transfer_fen_max: int = 0
    deposit_fen_max: int = 0
    family_aid_per_settlement_fen_max: int = 0   # 家庭共济: a payer's account pays at most this per settlement; 0 = no cap
    family_aid_beneficiaries_per_payer_max: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0   # 家庭共济: cards one payer may cover (0..255; 0 = no limit; 65 above it)
    pin_tries_social_max: int = 6
    pin_tries_bank_max: int = 3


class NodeConfig(msgspec.Struct, forbid_unknown_fields=True):
    institution_id: str                  # field 32 in responses
    regions: list[RegionSpec]
    ins_types: list[InsTypeSpec]
    policies: list[PolicySpec]
    institutions: list[InstitutionSpec]
    terminals: list[TerminalSpec]
    limits: Limits = msgspec.field(default_factory=Limits)
