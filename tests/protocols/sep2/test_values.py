"""Key values of representative envoy captures, checked field by field."""

from __future__ import annotations

import pytest

from protocols.sep2 import (
    DefaultDERControl,
    DERCapability,
    DERControl,
    DERControlList,
    DERControlResponse,
    DERProgramList,
    DERSettings,
    DERStatus,
    DeviceCapability,
    EndDevice,
    EndDeviceList,
    Error,
    FunctionSetAssignments,
    MirrorMeterReading,
    MirrorMeterReadingList,
    MirrorUsagePoint,
    MirrorUsagePointList,
    Notification,
    ResponseList,
    ResponseSetList,
    Subscription,
    SubscriptionList,
    TariffProfile,
    Time,
    decode,
    decode_as,
    to_percent,
    to_watts,
)
from protocols.sep2.models import ConnectionPoint, RateComponentList
from tests.protocols.sep2.envoy_fixtures import load


def control(name: str) -> DERControl:
    return decode_as(DERControl, load(name))


def test_active_control_limits_in_watts() -> None:
    derc = control("derc.xml")
    base = derc.der_control_base
    assert derc.href == "/edev/8/derp/1/derc/6"
    assert derc.reply_to == "/edev/8/rsps/site_control/rsp"
    assert derc.response_required == "03"
    assert derc.mrid == "30000000000000000000000600000000"
    assert derc.creation_time == 1795822067
    assert derc.interval.start == 1795821900
    assert derc.interval.duration == 1800
    assert derc.event_status is not None
    assert derc.event_status.current_status == 1
    assert derc.event_status.potentially_superseded is False
    assert base.op_mod_exp_lim_w is not None
    assert base.op_mod_imp_lim_w is not None
    # Per-value multipliers: 15000×10^-1 and 7000×10^0.
    assert (base.op_mod_exp_lim_w.value, base.op_mod_exp_lim_w.multiplier) == (15000, -1)
    assert to_watts(base.op_mod_exp_lim_w) == 1500.0
    assert to_watts(base.op_mod_imp_lim_w) == 7000.0
    assert base.op_mod_gen_lim_w is None
    assert base.op_mod_connect is None


@pytest.mark.parametrize(
    ("name", "field", "watts"),
    [
        ("derc-zero-export.xml", "op_mod_exp_lim_w", 0.0),
        ("derc-zero-export.xml", "op_mod_imp_lim_w", 5000.0),
        ("derc-gen-load-limit.xml", "op_mod_gen_lim_w", 3000.0),
        ("derc-gen-load-limit.xml", "op_mod_load_lim_w", 4000.0),
        ("derc-large-values-multiplier.xml", "op_mod_exp_lim_w", 50000.0),
        ("derc-large-values-multiplier.xml", "op_mod_imp_lim_w", 12345.0),  # envoy truncated
        ("derc-superseded.xml", "op_mod_exp_lim_w", 3000.0),
        ("derc-superseding.xml", "op_mod_exp_lim_w", 2800.0),
        ("v1.3/derc-storage-target.xml", "op_mod_storage_target_w", -2500.0),
        ("v1.3/derc.xml", "op_mod_exp_lim_w", 1500.0),
    ],
)
def test_limits_after_multipliers(name: str, field: str, watts: float) -> None:
    power = getattr(control(name).der_control_base, field)
    assert to_watts(power) == watts


def test_connect_energize_and_randomization() -> None:
    derc = control("derc-connect-energize-randomized.xml")
    assert derc.der_control_base.op_mod_connect is True
    assert derc.der_control_base.op_mod_energize is False
    assert derc.randomize_start == 60
    assert derc.interval.duration == 900


def test_fixed_w_is_hundredths_of_percent_and_ramp_hundredths_of_second() -> None:
    base = control("derc-fixedw-ramptms.xml").der_control_base
    assert base.op_mod_fixed_w == 5000
    assert to_percent(base.op_mod_fixed_w) == 50.0
    assert base.ramp_tms == 3000


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("derc-cancelled.xml", 2),
        ("derc-cancelled-randomized.xml", 3),
        ("derc-superseded.xml", 4),
        ("derc-superseding.xml", 0),
    ],
)
def test_event_status(name: str, status: int) -> None:
    event_status = control(name).event_status
    assert event_status is not None
    assert event_status.current_status == status


def test_default_der_control() -> None:
    dderc = decode_as(DefaultDERControl, load("dderc.xml"))
    assert dderc.version == 1
    assert dderc.set_grad_w == 27
    assert dderc.der_control_base.op_mod_exp_lim_w is not None
    assert to_watts(dderc.der_control_base.op_mod_exp_lim_w) == 1500.0


def test_default_der_control_seed_fractional_values() -> None:
    base = decode_as(DefaultDERControl, load("v1.3/dderc-derp3-seed-fractional.xml"))
    b = base.der_control_base
    assert b.op_mod_imp_lim_w is not None
    assert b.op_mod_exp_lim_w is not None
    assert b.op_mod_gen_lim_w is not None
    assert b.op_mod_load_lim_w is not None
    assert b.op_mod_storage_target_w is not None
    got = [to_watts(p) for p in (b.op_mod_imp_lim_w, b.op_mod_exp_lim_w, b.op_mod_gen_lim_w)]
    assert got == [20.20, 19.19, 18.18]
    assert to_watts(b.op_mod_load_lim_w) == 17.17
    assert to_watts(b.op_mod_storage_target_w) == 15.15
    assert base.set_grad_w == 16


def test_default_der_control_without_group_default_is_empty() -> None:
    dderc = decode_as(DefaultDERControl, load("dderc-derp2-no-group-default.xml"))
    assert dderc.der_control_base == type(dderc.der_control_base)()
    assert dderc.version == 0


def test_der_control_list_paging_attributes() -> None:
    page = decode_as(DERControlList, load("derc-list.xml"))
    assert (page.all, page.results, page.subscribable, page.poll_rate) == (10, 3, 1, None)
    assert [c.href for c in page.items] == [f"/edev/8/derp/1/derc/{i}" for i in (6, 7, 8)]
    assert len(decode_as(DERControlList, load("derc-list-all.xml")).items) == 10
    assert len(decode_as(DERControlList, load("v1.3/derc-list-all.xml")).items) == 11
    past_end = decode_as(DERControlList, load("derc-list-past-end.xml"))
    assert (past_end.all, past_end.results, past_end.items) == (10, 0, ())
    default_limit = decode_as(DERControlList, load("derc-list-default-limit.xml"))
    assert (default_limit.all, default_limit.results) == (10, 1)
    active = decode_as(DERControlList, load("actderc-list.xml"))
    assert active.href == "/edev/8/derp/1/actderc"


def test_end_device_list_paging_and_unnormalised_lfdi() -> None:
    page1 = decode_as(EndDeviceList, load("agg-edev-list.xml"))
    assert (page1.all, page1.results, page1.poll_rate, page1.subscribable) == (4, 2, 300, 1)
    virtual, seed4 = page1.items
    assert virtual.href == "/edev/0"
    assert virtual.subscribable == 0
    assert virtual.device_category == "00"
    assert virtual.subscription_list_link is not None
    assert virtual.subscription_list_link.all == 4
    assert virtual.lfdi == "CF03F364A0A01AF1AA0766544E8554A3359A6D59"  # uppercase
    assert seed4.lfdi == "4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d"  # lowercase, kept as sent
    assert seed4.sfdi == 4444
    page2 = decode_as(EndDeviceList, load("agg-edev-list-page2.xml"))
    assert [d.href for d in page2.items] == ["/edev/2", "/edev/1"]
    assert page2.items[1].post_rate == 111
    assert decode_as(EndDeviceList, load("edev-list-unregistered.xml")).items == ()


def test_end_device() -> None:
    edev = decode_as(EndDevice, load("edev.xml"))
    assert edev.device_category == "200000"
    assert edev.sfdi == 646847986525
    assert edev.enabled is True
    assert edev.connection_point_link is not None
    assert edev.connection_point_link.href == "/edev/8/cp"
    assert edev.log_event_list_link is not None
    assert edev.log_event_list_link.all is None  # ListLink without `all`
    assert edev.registration_link is not None
    disabled = decode_as(EndDevice, load("edev-registration-disabled.xml"))
    assert disabled.registration_link is None


def test_device_capability_and_time() -> None:
    dcap = decode_as(DeviceCapability, load("dcap.xml"))
    assert dcap.poll_rate == 300
    assert dcap.time_link is not None
    assert dcap.time_link.href == "/tm"
    assert dcap.end_device_list_link is not None
    assert dcap.end_device_list_link.all == 1
    assert decode_as(DeviceCapability, load("dcap-unregistered.xml")).poll_rate is None
    tm = decode_as(Time, load("tm.xml"))
    assert (tm.current_time, tm.tz_offset, tm.quality, tm.local_time) == (1795822066, 0, 4, None)


def test_function_set_assignments_links_before_mrid() -> None:
    fsa = decode_as(FunctionSetAssignments, load("fsa.xml"))
    assert fsa.der_program_list_link is not None
    assert fsa.der_program_list_link.all == 3
    assert fsa.mrid == "40000000000000080000000100000000"
    assert fsa.description == ""  # present but empty, not absent


def test_der_program_list() -> None:
    programs = decode_as(DERProgramList, load("derp-list.xml"))
    assert [p.primacy for p in programs.items] == [0, 1, 2]
    assert programs.poll_rate == 60


def test_mirror_usage_points_and_readings() -> None:
    mup = decode_as(MirrorUsagePoint, load("mup.xml"))
    assert mup.role_flags == "03"
    assert mup.post_rate == 60
    assert len(mup.mirror_meter_readings) == 4
    voltage = mup.mirror_meter_readings[2].reading_type
    assert voltage is not None
    assert (voltage.uom, voltage.phase, voltage.power_of_ten_multiplier) == (29, 129, -1)
    listing = decode_as(MirrorUsagePointList, load("mup-list.xml"))
    assert [m.role_flags for m in listing.items] == ["03", "49"]

    batch = decode_as(MirrorMeterReadingList, load("req-mmr-list.xml"))
    assert (batch.all, batch.results, batch.href) == (4, 4, None)
    first_set = batch.items[0].mirror_reading_sets[0]
    assert first_set.time_period.duration == 900
    assert [r.value for r in first_set.readings] == [-2100, -2200, -2050]

    single = decode_as(MirrorMeterReading, load("req-mmr.xml"))
    assert single.reading is not None
    assert (single.reading.value, single.reading.quality_flags) == (-2345, "01")

    der_mup = decode_as(MirrorUsagePoint, load("req-mup-der.xml"))
    initial = der_mup.mirror_meter_readings[0]
    assert initial.reading is not None
    assert initial.reading.value == 4210
    assert initial.reading_type is not None


def test_responses() -> None:
    response = decode(load("response.xml"))
    assert isinstance(response, DERControlResponse)
    assert (response.status, response.subject) == (1, "30000000000000000000000600000000")
    rsps = decode_as(ResponseList, load("rsps-list.xml"))
    assert [r.status for r in rsps.items] == [7, 6, 2, 1]  # newest first
    for name, status in [
        ("req-derc-response-received.xml", 1),
        ("req-derc-response-started.xml", 2),
        ("req-derc-response-cancelled.xml", 6),
        ("req-derc-response-superseded.xml", 7),
    ]:
        assert decode_as(DERControlResponse, load(name)).status == status
    sets = decode_as(ResponseSetList, load("rsps-set-list.xml"))
    assert [s.href for s in sets.items] == ["/edev/8/rsps/price", "/edev/8/rsps/site_control"]


def test_subscriptions() -> None:
    subs = decode_as(SubscriptionList, load("agg-sub-list.xml"))
    assert (subs.all, subs.results) == (6, 6)
    conditional = subs.items[3]
    assert conditional.condition is not None
    assert conditional.condition.upper_threshold == 11
    sub = decode_as(Subscription, load("req-agg-subscription-derc.xml"))
    assert (sub.level, sub.limit, sub.encoding) == ("+S1", 10, 0)
    assert sub.notification_uri == "http://127.0.0.1:58002/ntfy/derc"


@pytest.mark.parametrize("folder", ["", "v1.3/"])
def test_notification_xsi_type_resources(folder: str) -> None:
    created = decode_as(Notification, load(f"{folder}notification-derc-list.xml"))
    assert isinstance(created.resource, DERControlList)
    assert created.status == 0
    assert created.resource.items[0].der_control_base.op_mod_exp_lim_w is not None
    cancelled = decode_as(Notification, load(f"{folder}notification-derc-list-cancelled.xml"))
    assert cancelled.status == 4  # envoy: a cancelled control, not a cancelled subscription
    assert isinstance(cancelled.resource, DERControlList)
    event_status = cancelled.resource.items[0].event_status
    assert event_status is not None
    assert event_status.current_status == 2
    default = decode_as(Notification, load(f"{folder}notification-dderc.xml"))
    assert isinstance(default.resource, DefaultDERControl)
    assert default.resource.version == 2
    assert default.subscription_uri == "/edev/1/sub/8"
    assert default.resource.der_control_base.op_mod_exp_lim_w is not None
    assert to_watts(default.resource.der_control_base.op_mod_exp_lim_w) == 1000.0


def test_der_resources_and_csipaus_extensions() -> None:
    cap = decode_as(DERCapability, load("der-capability.xml"))
    assert (cap.type, cap.modes_supported, cap.doe_modes_supported) == (83, "019001FF", "0F")
    assert cap.vpp_modes_supported is None
    assert to_watts(cap.rtg_max_w) == 5000.0
    assert cap.rtg_min_pf_over_excited is not None
    assert cap.rtg_min_pf_over_excited.displacement == 80
    cap13 = decode_as(DERCapability, load("v1.3/der-capability.xml"))
    assert cap13.vpp_modes_supported == "01"

    settings = decode_as(DERSettings, load("der-settings.xml"))
    assert (settings.set_grad_w, settings.doe_modes_enabled) == (27, "0F")
    settings13 = decode_as(DERSettings, load("v1.3/der-settings.xml"))
    assert settings13.vpp_modes_enabled == "01"
    assert settings13.set_min_wh is not None
    assert settings13.set_min_wh.value == 1350

    status = decode_as(DERStatus, load("der-status.xml"))
    assert status.alarm_status == "00"  # PUT as 00000000, served back shortened
    assert status.state_of_charge_status is not None
    assert status.state_of_charge_status.value == 6550
    assert status.manufacturer_status is not None
    assert status.manufacturer_status.value == "OK"

    tp13 = decode_as(TariffProfile, load("v1.3/tp.xml"))
    assert tp13.combined_time_tariff_interval_list_link is not None
    assert decode_as(RateComponentList, load("rc-list.xml")).href is None


def test_connection_point_variants() -> None:
    assert decode_as(ConnectionPoint, load("connection-point.xml")).connection_point_id == (
        "2001234567"
    )
    assert decode_as(ConnectionPoint, load("v1.3/connection-point.xml")).href == "/edev/8/cp"
    before = decode_as(ConnectionPoint, load("connection-point-before-put.xml"))
    assert before.connection_point_id == ""
    legacy = decode_as(ConnectionPoint, load("req-connection-point-legacy-id.xml"))
    assert legacy.connection_point_id == "2001234560"  # <csipaus:id> read as the new name


@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        ("error-no-client-cert.xml", 16384, "Internal Server Error."),
        ("error-edev-post-malformed.xml", 0, "expected '>', line 1, column 82"),
        ("error-not-found-path.xml", 0, "Not Found"),
    ],
)
def test_error_documents(name: str, code: int, message: str) -> None:
    error = decode_as(Error, load(name))
    assert (error.reason_code, error.message) == (code, message)


def test_connection_point_current_name_wins_over_legacy_alias() -> None:
    ns = b'xmlns="urn:ieee:std:2030.5:ns" xmlns:csipaus="https://csipaus.org/ns"'
    for body in (
        b"<csipaus:id>1</csipaus:id><csipaus:connectionPointId>2</csipaus:connectionPointId>",
        b"<csipaus:connectionPointId>2</csipaus:connectionPointId><csipaus:id>1</csipaus:id>",
    ):
        doc = b"<csipaus:ConnectionPoint " + ns + b">" + body + b"</csipaus:ConnectionPoint>"
        assert decode_as(ConnectionPoint, doc).connection_point_id == "2"
