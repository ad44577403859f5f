"""A small UCUM subset: parse unit codes into (factor, dimensions) so commensurable units convert.

Only what lab and vital-sign results use (prefixes, g, L, mol, eq, U, [IU], %, time, mm[Hg], Cel,
annotations). Conversions that need chemistry (mg/dL <-> mmol/L) are data in the graph, not here.
"""

from __future__ import annotations

import re
from functools import lru_cache

from clinragen_fhir.knowledge.errors import UnitConversionError

Dims = tuple[tuple[str, int], ...]

_PREFIX: dict[str, float] = {
    "G": 1e9, "M": 1e6, "k": 1e3, "h": 1e2, "da": 1e1, "d": 1e-1, "c": 1e-2, "m": 1e-3,
    "u": 1e-6, "n": 1e-9, "p": 1e-12, "f": 1e-15, "a": 1e-18,
}
# atom -> (factor to base, dimensions, may take a prefix)
_ATOMS: dict[str, tuple[float, dict[str, int], bool]] = {
    "g": (1.0, {"M": 1}, True),
    "L": (1e-3, {"L": 3}, True),
    "l": (1e-3, {"L": 3}, True),
    "m": (1.0, {"L": 1}, True),
    "s": (1.0, {"T": 1}, True),
    "min": (60.0, {"T": 1}, False),
    "h": (3600.0, {"T": 1}, False),
    "d": (86400.0, {"T": 1}, False),
    "wk": (604800.0, {"T": 1}, False),
    "mol": (1.0, {"N": 1}, True),
    "eq": (1.0, {"N": 1}, True),
    "U": (1.0, {"U": 1}, True),
    "[IU]": (1.0, {"IU": 1}, True),
    "[iU]": (1.0, {"IU": 1}, True),
    "%": (0.01, {}, False),
    "[pH]": (1.0, {"pH": 1}, False),
    "mm[Hg]": (1.0, {"P": 1}, False),
    "[HPF]": (1.0, {"HPF": 1}, False),
    "[LPF]": (1.0, {"LPF": 1}, False),
    "Cel": (1.0, {"K": 1}, False),
    "[degF]": (1.0, {"K": 1}, False),
    "K": (1.0, {"K": 1}, False),
    "[lb_av]": (453.59237, {"M": 1}, False),
    "[oz_av]": (28.349523125, {"M": 1}, False),
    "[in_i]": (0.0254, {"L": 1}, False),
    "[ft_i]": (0.3048, {"L": 1}, False),
    "1": (1.0, {}, False),
}
_TEMPERATURE = {"Cel", "[degF]", "K"}

# Non-UCUM spellings seen in FHIR data, mapped to UCUM before parsing.
_TEXT_ALIASES: dict[str, str] = {
    "mmhg": "mm[Hg]", "mm hg": "mm[Hg]", "bpm": "/min", "beats/min": "/min",
    "breaths/min": "/min", "/min": "/min", "per min": "/min", "°c": "Cel", "degc": "Cel",
    "c": "Cel", "°f": "[degF]", "degf": "[degF]", "f": "[degF]", "percent": "%",
    "ph": "[pH]", "lb": "[lb_av]", "lbs": "[lb_av]", "in": "[in_i]", "inch": "[in_i]",
    "meq/l": "meq/L", "mg/dl": "mg/dL", "g/dl": "g/dL", "ml/min/1.73m2": "mL/min/{1.73_m2}",
    "ml/min/1.73 m2": "mL/min/{1.73_m2}", "ml/min": "mL/min", "iu/l": "[IU]/L",
    "miu/l": "m[IU]/L", "uiu/ml": "u[IU]/mL", "kg/m^2": "kg/m2", "fl": "fL",
    "x10^3/ul": "10*3/uL", "x10^6/ul": "10*6/uL", "10^3/ul": "10*3/uL", "10^6/ul": "10*6/uL",
    "k/ul": "10*3/uL", "m/ul": "10*6/uL", "ng/l": "ng/L", "pg/ml": "pg/mL", "ug/l": "ug/L",
    "umol/l": "umol/L", "mmol/l": "mmol/L", "u/l": "U/L", "": "1",
}


def normalise(unit: str) -> str:
    """The UCUM code for a unit as sent (UCUM codes pass unchanged)."""
    text = unit.strip().replace("µ", "u").replace("μ", "u")
    return _TEXT_ALIASES.get(text.lower(), text) if text.lower() in _TEXT_ALIASES else text


_TOKEN = re.compile(r"([./])")
_EXP = re.compile(r"^(.*?)([+-]?\d+)$")


def _atom(term: str) -> tuple[float, dict[str, int]]:
    term = re.sub(r"\{[^}]*\}", "", term)
    if term == "":
        return 1.0, {}
    if m := re.fullmatch(r"10[*^]([+-]?\d+)", term):
        return 10.0 ** int(m.group(1)), {}
    if term.isdigit():
        return float(term), {}
    exp = 1
    if term not in _ATOMS and (m := _EXP.match(term)) and m.group(1):
        term, exp = m.group(1), int(m.group(2))
    if term in _ATOMS:
        factor, dims, _ = _ATOMS[term]
    else:
        for plen in (2, 1):
            prefix, rest = term[:plen], term[plen:]
            if prefix in _PREFIX and rest in _ATOMS and _ATOMS[rest][2]:
                factor, dims, _ = _ATOMS[rest]
                factor *= _PREFIX[prefix]
                break
        else:
            raise UnitConversionError(f"unit term {term!r} is not UCUM")
    return factor**exp, {k: v * exp for k, v in dims.items()}


@lru_cache(maxsize=1024)
def parse(unit: str) -> tuple[float, Dims]:
    """(factor to base units, dimensions) of a UCUM code; raises UnitConversionError."""
    code = normalise(unit)
    if code.count("{") != code.count("}"):
        raise UnitConversionError(f"unbalanced annotation in unit {unit!r}")
    # annotations may contain '.' or '/': drop them before splitting
    code = re.sub(r"\{[^}]*\}", "", code) or "1"
    factor, dims = 1.0, {}  # type: float, dict[str, int]
    sign = 1
    for token in _TOKEN.split(code):
        if token == "/":
            sign = -1
            continue
        if token == ".":
            sign = 1
            continue
        f, d = _atom(token)
        factor *= f**sign
        for k, v in d.items():
            dims[k] = dims.get(k, 0) + v * sign
    return factor, tuple(sorted((k, v) for k, v in dims.items() if v))


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """value in from_unit expressed in to_unit, when the two are commensurable."""
    src, dst = normalise(from_unit), normalise(to_unit)
    if src == dst:
        return value
    if src in _TEMPERATURE and dst in _TEMPERATURE:
        kelvin = {"Cel": value + 273.15, "K": value,
                  "[degF]": (value - 32) * 5 / 9 + 273.15}[src]
        return {"Cel": kelvin - 273.15, "K": kelvin, "[degF]": (kelvin - 273.15) * 9 / 5 + 32}[dst]
    f_src, d_src = parse(src)
    f_dst, d_dst = parse(dst)
    if d_src != d_dst:
        raise UnitConversionError(f"cannot convert {from_unit!r} to {to_unit!r}")
    return value * f_src / f_dst
