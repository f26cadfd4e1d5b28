"""Register-exact tests of the pure SunSpec codec (no I/O)."""

from __future__ import annotations

import math

import pytest

from protocols.sunspec import (
    END_MODEL_ID,
    SUNS_MARKER,
    MapCorrupt,
    MapNotFound,
    MapTruncated,
    ModelMissing,
    PointDef,
    PointNotImplemented,
    ScaleFactorMissing,
    SunSpecError,
    UnknownModel,
    UnknownPoint,
    ValueOutOfRange,
    build_map,
    decode_model,
    decode_point,
    decode_scale_factors,
    encode_points,
    load_model_def,
    parse_model_chain,
    require,
    scale,
    unscale,
)

M1 = load_model_def(1)
M701 = load_model_def(701)
M702 = load_model_def(702)
M704 = load_model_def(704)
M713 = load_model_def(713)
M802 = load_model_def(802)


def _point(ptype: str, size: int = 1) -> PointDef:
    return PointDef(name="P", type=ptype, offset=0, size=size)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- definitions


def test_offsets_come_from_the_official_definitions() -> None:
    assert (M1.length, M701.length, M702.length, M704.length, M713.length, M802.length) == (
        66,
        153,
        50,
        65,
        7,
        62,
    )
    assert M1.point("Mn").offset == 2
    assert M1.point("Mn").size == 16
    assert M701.point("W").offset == 10
    assert M701.point("W").sf == "W_SF"
    wset = M704.point("WSet")
    assert (wset.offset, wset.size, wset.type) == (24, 2, "int32")
    assert (wset.sf, wset.writable) == ("WSet_SF", True)
    assert M704.point("WSetEna").symbols == {"DISABLED": 0, "ENABLED": 1}
    assert M704.point("WSetRvrtTms").offset == 31
    assert M713.point("SoC").offset == 4
    assert M713.point("SoC").sf == "Pct_SF"
    assert not M701.point("W").writable
    # Fixed-count sub-groups are flattened after the top-level points.
    assert M704.point("PFWAbsRvrt.Ext").end == M704.size
    assert M704.span("WSetEna", "WSetRvrtTms") == (22, 11)


def test_unknown_model_and_point() -> None:
    with pytest.raises(UnknownModel) as info:
        load_model_def(9999)
    assert info.value.model_id == 9999
    with pytest.raises(UnknownPoint) as point_info:
        M704.point("Nope")
    assert (point_info.value.model_id, point_info.value.point) == (704, "Nope")
    assert issubclass(UnknownModel, SunSpecError)


# --------------------------------------------------------------------------- decoding


def test_decode_713_register_image_with_scale_factors_and_sentinels() -> None:
    # ID, L, WHRtg, WHAvail, SoC, SoH (not implemented), Sta, WH_SF=1, Pct_SF=-1
    regs = [713, 7, 1350, 675, 553, 0xFFFF, 0, 1, 0xFFFF]
    values = decode_model(M713, regs)
    assert values == {
        "ID": 713,
        "L": 7,
        "WHRtg": 13500,
        "WHAvail": 6750,
        "SoC": 55.3,
        "SoH": None,
        "Sta": 0,
        "WH_SF": 1,
        "Pct_SF": -1,
    }


def test_a_not_implemented_scale_factor_makes_its_points_unknown() -> None:
    regs = [713, 7, 1350, 675, 553, 0xFFFF, 0, 0x8000, 0xFFFF]
    values = decode_model(M713, regs)
    assert values["WH_SF"] is None
    assert values["WHRtg"] is None
    assert values["WHAvail"] is None
    assert values["SoC"] == 55.3


@pytest.mark.parametrize(
    ("ptype", "size", "registers", "expected"),
    [
        ("int16", 1, [0x8000], None),
        ("int16", 1, [0xFFFF], -1),
        ("int16", 1, [0x7FFF], 32767),
        ("uint16", 1, [0xFFFF], None),
        ("uint16", 1, [0xFFFE], 65534),
        ("enum16", 1, [0xFFFF], None),
        ("bitfield16", 1, [0xFFFF], None),
        ("sunssf", 1, [0x8000], None),
        ("sunssf", 1, [0xFFFD], -3),
        ("int32", 2, [0x8000, 0x0000], None),
        ("int32", 2, [0xFFFF, 0xEC78], -5000),
        ("uint32", 2, [0xFFFF, 0xFFFF], None),
        ("uint32", 2, [0x0001, 0x0000], 65536),
        ("acc32", 2, [0, 0], None),
        ("acc32", 2, [0, 7], 7),
        ("enum32", 2, [0xFFFF, 0xFFFF], None),
        ("bitfield32", 2, [0xFFFF, 0xFFFF], None),
        ("bitfield32", 2, [0x0000, 0x0005], 5),
        ("uint64", 4, [0xFFFF] * 4, None),
        ("uint64", 4, [0, 0, 1, 2], 65538),
        ("int64", 4, [0x8000, 0, 0, 0], None),
        ("float32", 2, [0x7FC0, 0x0000], None),
        ("float32", 2, [0x3FC0, 0x0000], 1.5),
        ("pad", 1, [0x8000], None),
        ("string", 2, [0, 0], None),
        ("string", 2, [0x4142, 0x4300], "ABC"),
    ],
)
def test_decode_point_types(ptype: str, size: int, registers: list[int], expected: object) -> None:
    assert decode_point(_point(ptype, size), registers) == expected


def test_decode_partial_window_uses_cached_scale_factors() -> None:
    w = M701.point("W")
    # Only W is read during a poll; W_SF comes from the connect-time cache.
    assert decode_model(M701, [0xEC78], start_offset=w.offset, sfs={"W_SF": 0}) == {"W": -5000}
    assert decode_model(M701, [1234], start_offset=w.offset, sfs={"W_SF": -1}) == {"W": 123.4}
    with pytest.raises(ScaleFactorMissing) as info:
        decode_model(M701, [1234], start_offset=w.offset)
    assert (info.value.point, info.value.sf) == ("W", "W_SF")


def test_decode_scale_factors_only() -> None:
    regs = [713, 7, 1350, 675, 553, 0xFFFF, 0, 1, 0xFFFF]
    assert decode_scale_factors(M713, regs) == {"WH_SF": 1, "Pct_SF": -1}


def test_scale_and_unscale() -> None:
    assert scale(1234, -2) == 12.34
    assert scale(5, 3) == 5000
    assert unscale(12.34, -2) == 1234
    assert unscale(5000, 3) == 5
    assert unscale(-5000.0, 0) == -5000


def test_require_reports_not_implemented_points() -> None:
    values = decode_model(M713, [713, 7, 1350, 675, 553, 0xFFFF, 0, 1, 0xFFFF])
    assert require(M713, values, "SoC") == 55.3
    with pytest.raises(PointNotImplemented) as info:
        require(M713, values, "SoH")
    assert (info.value.model_id, info.value.point) == (713, "SoH")


# --------------------------------------------------------------------------- encoding


def test_encode_704_setpoint_block_is_one_exact_run() -> None:
    runs = encode_points(
        M704,
        {
            "WSetEna": 1,
            "WSetMod": 1,
            "WSet": -5000,
            "WSetRvrt": 0,
            "WSetPct": 0,
            "WSetPctRvrt": 0,
            "WSetEnaRvrt": 1,
            "WSetRvrtTms": 300,
        },
        {"WSet_SF": 0, "WSetPct_SF": -2},
    )
    assert runs == [(22, [1, 1, 0xFFFF, 0xEC78, 0, 0, 0, 0, 1, 0, 300])]


def test_encode_applies_scale_factor_and_splits_non_contiguous_points() -> None:
    runs = encode_points(M704, {"WSet": 1234.5, "WSetRvrtTms": 70000}, {"WSet_SF": 1})
    assert runs == [(24, [0, 123]), (31, [1, 70000 - 65536])]


def test_encode_decode_round_trip_for_a_whole_model() -> None:
    values = {"WHRtg": 13500, "WHAvail": 6750, "SoC": 55.3, "Sta": 0, "WH_SF": 1, "Pct_SF": -1}
    image = build_map([(M713, values)], base_address=0)
    decoded = decode_model(M713, list(image.registers[2:11]))
    assert decoded == {"ID": 713, "L": 7, "SoH": None, **values}


@pytest.mark.parametrize(
    ("name", "value", "sfs"),
    [
        ("WSet", 2**31, {"WSet_SF": 0}),  # beyond int32
        ("WSet", -(2**31), {"WSet_SF": 0}),  # the sentinel itself
        ("WSet", math.nan, {"WSet_SF": 0}),
        ("WSet", math.inf, {"WSet_SF": 0}),
        ("WSetEna", 2, {}),  # not one of the enum's symbols
        ("WSetRvrtTms", -1, {}),  # negative uint32
        ("WSetRvrtTms", 1.5, {}),  # fraction of an unscaled integer
        ("WSet", "5", {"WSet_SF": 0}),
        ("WSet_SF", 11, {}),  # scale factors are -10..10
    ],
)
def test_encode_rejects_out_of_range(name: str, value: object, sfs: dict[str, int | None]) -> None:
    with pytest.raises(ValueOutOfRange) as info:
        encode_points(M704, {name: value}, sfs)  # type: ignore[dict-item]
    assert (info.value.model_id, info.value.point) == (704, name)


def test_encode_needs_scale_factor() -> None:
    with pytest.raises(ScaleFactorMissing):
        encode_points(M704, {"WSet": 100}, {})
    with pytest.raises(ScaleFactorMissing):
        encode_points(M704, {"WSet": 100}, {"WSet_SF": None})


def test_encode_strings_and_not_implemented() -> None:
    assert encode_points(M1, {"Opt": "AB"}) == [(34, [0x4142] + [0] * 7)]
    with pytest.raises(ValueOutOfRange):
        encode_points(M1, {"Opt": "x" * 17})
    assert encode_points(M704, {"WSetEna": None, "WSet": None}) == [
        (22, [0xFFFF]),
        (24, [0x8000, 0x0000]),
    ]


# --------------------------------------------------------------------------- model chain


def _battery_image(base: int = 40000) -> tuple[int, ...]:
    return build_map(
        [
            (M1, {"Mn": "Acme", "SN": "X1", "DA": 1}),
            (M701, {"W_SF": 0, "W": 1500}),
            (M713, {"Pct_SF": -1, "SoC": 42.5}),
        ],
        base_address=base,
    ).registers


def test_build_map_layout_is_register_exact() -> None:
    image = build_map([(M1, {"Mn": "Acme"}), (M713, {"Pct_SF": -1, "SoC": 42.5})], base_address=0)
    regs = image.registers
    assert regs[:4] == (0x5375, 0x6E53, 1, 66)
    assert regs[4:6] == (0x4163, 0x6D65)  # "Acme"
    assert regs[6:20] == (0,) * 14
    assert regs[69] == 0x8000  # model 1 Pad
    assert regs[70:72] == (713, 7)
    assert regs[74] == 425
    assert regs[78] == 0xFFFF
    assert regs[75] == 0xFFFF
    assert regs[72] == 0xFFFF
    assert regs[-2:] == (END_MODEL_ID, 0)
    assert len(regs) == 2 + 68 + 9 + 2
    assert [(m.model_id, m.address, m.length) for m in image.layout.models] == [
        (1, 2, 66),
        (713, 70, 7),
    ]


def test_parse_model_chain_from_a_dense_image() -> None:
    regs = _battery_image()
    layout = parse_model_chain(regs, 40000)
    assert layout.model_ids == (1, 701, 713)
    assert layout.find(701).address == 40002 + 68
    assert layout.find(713).end == 40000 + len(regs) - 2
    assert 713 in layout
    assert 704 not in layout
    with pytest.raises(ModelMissing) as info:
        layout.find(704)
    assert info.value.model_id == 704


def test_parse_model_chain_asks_for_exactly_the_registers_it_needs() -> None:
    full = dict(enumerate(_battery_image(0)))
    image: dict[int, int] = {}
    requests: list[tuple[int, int]] = []
    while True:
        try:
            layout = parse_model_chain(image, 0)
            break
        except MapTruncated as need:
            requests.append((need.address, need.count))
            image.update({a: full[a] for a in range(need.address, need.address + need.count)})
    assert requests == [(0, 4), (70, 2), (225, 2), (234, 2)]
    assert layout.model_ids == (1, 701, 713)


def test_end_marker_without_length_register_is_accepted() -> None:
    regs = list(_battery_image(0))[:-1]  # drop the end marker's L
    assert parse_model_chain(regs, 0).model_ids == (1, 701, 713)


@pytest.mark.parametrize("start", [[0x5375, 0x6E54], [0, 0], [0x6E53, 0x5375], [0xFFFF, 0xFFFF]])
def test_missing_or_bogus_marker_is_map_not_found(start: list[int]) -> None:
    with pytest.raises(MapNotFound) as info:
        parse_model_chain([*start, 1, 66], 40000)
    assert info.value.address == 40000
    assert info.value.found == tuple(start)


def test_empty_image_asks_for_marker_and_first_header() -> None:
    with pytest.raises(MapTruncated) as info:
        parse_model_chain([], 50000)
    assert (info.value.address, info.value.count) == (50000, 4)


def test_corrupt_chains() -> None:
    with pytest.raises(MapCorrupt):
        parse_model_chain([*SUNS_MARKER, 0, 10], 0)  # model id 0
    with pytest.raises(MapCorrupt):
        parse_model_chain([*SUNS_MARKER, 1, 0xFFF0], 40000)  # runs off the address space
    looping = {0: 0x5375, 1: 0x6E53}
    looping.update({a: (1 if a % 2 == 0 else 0) for a in range(2, 1000)})  # [1, 0] forever
    with pytest.raises(MapCorrupt):
        parse_model_chain(looping, 0)


# --------------------------------------------------------------------------- legacy (1xx) models

M103 = load_model_def(103)
M113 = load_model_def(113)
M120 = load_model_def(120)
M121 = load_model_def(121)
M123 = load_model_def(123)
M124 = load_model_def(124)
NI16, NU16 = 0x8000, 0xFFFF  # "not implemented" int16 / uint16 (and sunssf)


def test_legacy_layouts_come_from_the_official_definitions() -> None:
    lengths = {m: load_model_def(m).length for m in (101, 102, 103, 111, 112, 113)}
    assert lengths == {101: 50, 102: 50, 103: 50, 111: 60, 112: 60, 113: 60}
    assert [load_model_def(m).length for m in (120, 121, 122, 123, 124)] == [26, 30, 44, 24, 24]
    assert (M103.point("W").offset, M103.point("W").sf, M103.point("W_SF").offset) == (
        14,
        "W_SF",
        15,
    )
    assert (M113.point("W").offset, M113.point("W").type) == (22, "float32")
    assert M123.span("Conn", "WMaxLim_Ena") == (4, 6)
    assert M123.point("WMaxLimPct").sf == "WMaxLimPct_SF"
    assert M123.point("WMaxLimPct_SF").offset == 23
    assert M123.point("WMaxLim_Ena").symbols == {"DISABLED": 0, "ENABLED": 1}
    assert M124.span("OutWRte", "InOutWRte_RmpTms") == (12, 5)
    assert (M124.point("InWRte").type, M124.point("InWRte").sf) == ("int16", "InOutWRte_SF")
    # Bit numbers, not values (and the official file really spells it "DiSCHARGE").
    assert M124.point("StorCtl_Mod").symbols == {"CHARGE": 0, "DiSCHARGE": 1}
    assert M120.point("MaxDisChaRte").offset == 25
    assert M121.point("WMax_SF").offset == 22


def _m103_image() -> list[int]:
    regs = [NU16] * 52
    regs[0:2] = [103, 50]
    regs[2:7] = [1234, 412, NU16, 411, -2 & 0xFFFF]  # A, AphA, AphB (n/i), AphC, A_SF=-2
    regs[10:14] = [2301, 2302, 2299, -1 & 0xFFFF]  # PhVphA..C, V_SF=-1
    regs[14:16] = [-250 & 0xFFFF, 1]  # W=-250 × 10 (absorbing), W_SF=1
    regs[16:18] = [5001, -2 & 0xFFFF]  # Hz, Hz_SF
    regs[18:20] = [NI16, 0]  # VA not implemented, VA_SF
    regs[24:27] = [0x0001, 0x0002, 0]  # WH = 65538 (acc32), WH_SF=0
    regs[20:22] = [NI16, NI16]  # VAr, VAr_SF: both not implemented
    regs[31:33] = [1200, NI16]  # DCW present but its DCW_SF is not
    regs[38] = 4  # St: MPPT
    return regs


def test_decode_103_register_image_with_scale_factors_and_sentinels() -> None:
    values = decode_model(M103, _m103_image())
    assert values["A"] == 12.34
    assert values["AphB"] is None
    assert values["AphC"] == 4.11
    assert values["PhVphA"] == 230.1
    assert values["W"] == -2500
    assert values["Hz"] == 50.01
    assert values["VA"] is None
    assert values["WH"] == 65538
    assert values["St"] == 4
    # A point whose scale factor the device leaves "not implemented" has no value at all.
    assert values["VAr"] is None
    assert values["DCW"] is None
    # A poll reads W and W_SF only: two registers.
    offset, count = M103.span("W", "W_SF")
    assert decode_model(M103, _m103_image()[offset : offset + count], start_offset=offset) == {
        "W": -2500,
        "W_SF": 1,
    }


def test_decode_113_floats_and_nan_as_not_implemented() -> None:
    regs = [0] * 62
    regs[0:2] = [113, 60]
    regs[22:24] = [0x45BB, 0x8000]  # W = 6000.0
    regs[24:26] = [0x4248, 0x0000]  # Hz = 50.0
    regs[26:28] = [0x7FC0, 0x0000]  # VA = NaN: not implemented
    regs[48] = NU16  # St not implemented
    values = decode_model(M113, regs)
    assert (values["W"], values["Hz"], values["VA"], values["St"]) == (6000.0, 50.0, None, None)
    assert encode_points(M113, {"W": 6000.0}) == [(22, [0x45BB, 0x8000])]


def test_encode_123_curtailment_block_is_one_exact_run() -> None:
    runs = encode_points(
        M123,
        {
            "Conn": 1,
            "WMaxLimPct": 55.5,
            "WMaxLimPct_WinTms": 0,
            "WMaxLimPct_RvrtTms": 600,
            "WMaxLimPct_RmpTms": 0,
            "WMaxLim_Ena": 1,
        },
        {"WMaxLimPct_SF": -1},
    )
    assert runs == [(4, [1, 555, 0, 600, 0, 1])]
    with pytest.raises(ValueOutOfRange):
        encode_points(M123, {"WMaxLim_Ena": 2}, {})
    with pytest.raises(ScaleFactorMissing):
        encode_points(M123, {"WMaxLimPct": 50.0}, {"WMaxLimPct_SF": None})


def test_decode_and_encode_124_storage() -> None:
    regs = [NU16] * 26
    regs[0:2] = [124, 24]
    regs[2] = 500  # WChaMax 500 × 10 W
    regs[5] = 0b11  # StorCtl_Mod: CHARGE | DISCHARGE
    regs[8] = 553  # ChaState 55.3 %
    regs[11] = 4  # ChaSt: CHARGING
    regs[12:14] = [-400 & 0xFFFF, 400]  # OutWRte -40.0 %, InWRte 40.0 %: charge at 40 %
    regs[15] = 900  # InOutWRte_RvrtTms
    regs[18] = 1  # WChaMax_SF
    regs[22] = -1 & 0xFFFF  # ChaState_SF
    regs[25] = -1 & 0xFFFF  # InOutWRte_SF
    values = decode_model(M124, regs)
    assert values["WChaMax"] == 5000
    assert values["StorCtl_Mod"] == 3
    assert values["ChaState"] == 55.3
    assert (values["OutWRte"], values["InWRte"], values["InOutWRte_RvrtTms"]) == (-40.0, 40.0, 900)
    assert values["MinRsvPct"] is None  # its SF is not implemented
    assert values["ChaSt"] == M124.point("ChaSt").symbols["CHARGING"]
    runs = encode_points(
        M124,
        {"OutWRte": -40.0, "InWRte": 40.0, "InOutWRte_WinTms": 0, "InOutWRte_RvrtTms": 900},
        {"InOutWRte_SF": -1},
    )
    assert runs == [(12, [-400 & 0xFFFF, 400, 0, 900])]


def test_legacy_map_is_register_exact_and_parses() -> None:
    image = build_map(
        [
            (M1, {"Mn": "Acme"}),
            (M103, {"W_SF": 1, "W": -2500}),
            (M123, {"WMaxLimPct_SF": -1, "WMaxLimPct": 100.0, "WMaxLim_Ena": 0}),
        ],
        base_address=40000,
    )
    regs = image.registers
    m103 = [NU16] * 52
    m103[0:2] = [103, 50]
    for name in ("A", "AphA", "AphB", "AphC", "PPVphAB", "PPVphBC", "PPVphCA"):
        m103[M103.point(name).offset] = NU16
    for name in ("W", "VA", "VAr", "PF", "DCW", "TmpCab", "TmpSnk", "TmpTrns", "TmpOt"):
        m103[M103.point(name).offset] = NI16  # int16
    for name in [p.name for p in M103.points.values() if p.type == "sunssf"]:
        m103[M103.point(name).offset] = NI16
    m103[24:26] = [0, 0]  # WH: accumulators are "not implemented" as 0
    m103[40:52] = [NU16] * 12  # Evt*: bitfield32
    m103[14:16] = [-250 & 0xFFFF, 1]
    m123 = [NU16] * 26
    m123[0:2] = [123, 24]
    m123[10] = NI16  # OutPFSet
    m123[15:18] = [NI16] * 3  # VArWMaxPct, VArMaxPct, VArAvalPct
    m123[23:26] = [-1 & 0xFFFF, NI16, NI16]
    m123[5], m123[9] = 1000, 0
    assert list(regs[:4]) == [0x5375, 0x6E53, 1, 66]
    assert list(regs[70:122]) == m103
    assert list(regs[122:148]) == m123
    assert list(regs[148:]) == [END_MODEL_ID, 0]
    layout = parse_model_chain(regs, 40000)
    assert layout.model_ids == (1, 103, 123)
    assert layout.find(123).address == 40122
    assert decode_model(M123, regs[122:148])["WMaxLimPct"] == 100.0
