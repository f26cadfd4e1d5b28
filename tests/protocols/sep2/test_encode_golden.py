"""Byte-exact output of ``encode`` for hand-built models (golden strings written here)."""

from __future__ import annotations

import pytest

from protocols.sep2 import (
    ConnectionPoint,
    ConsumptionTariffInterval,
    ConsumptionTariffIntervalList,
    ConsumptionTariffIntervalListSummary,
    CsipAusVersion,
    DateTimeInterval,
    DefaultDERControl,
    DemandResponseProgram,
    DERControl,
    DERControlBase,
    DERControlList,
    DERControlResponse,
    DutyCycle,
    EndDeviceControl,
    EndDeviceControlList,
    EndDeviceList,
    Error,
    EventStatus,
    InvalidValue,
    Link,
    ListLink,
    Notification,
    Offset,
    RateComponent,
    TariffProfile,
    TimeTariffInterval,
    decode,
    encode,
    from_watts,
)
from protocols.sep2.models import ActivePower

EXPORT_LIMIT = DERControl(
    href="/derp/1/derc/1",
    reply_to="/rsps/1/rsp",
    response_required="03",
    mrid="A1" * 16,
    description="site export limit",
    creation_time=1795822000,
    event_status=EventStatus(current_status=0, date_time=1795822000, potentially_superseded=False),
    interval=DateTimeInterval(duration=1800, start=1795823800),
    der_control_base=DERControlBase(
        op_mod_imp_lim_w=from_watts(7000),
        op_mod_exp_lim_w=from_watts(1500),
    ),
)


def test_der_control_golden() -> None:
    assert encode(EXPORT_LIMIT) == (
        b'<DERControl xmlns="urn:ieee:std:2030.5:ns" xmlns:csipaus="https://csipaus.org/ns"'
        b' href="/derp/1/derc/1" replyTo="/rsps/1/rsp" responseRequired="03">'
        b"<mRID>A1A1A1A1A1A1A1A1A1A1A1A1A1A1A1A1</mRID>"
        b"<description>site export limit</description>"
        b"<creationTime>1795822000</creationTime>"
        b"<EventStatus><currentStatus>0</currentStatus><dateTime>1795822000</dateTime>"
        b"<potentiallySuperseded>false</potentiallySuperseded></EventStatus>"
        b"<interval><duration>1800</duration><start>1795823800</start></interval>"
        b"<DERControlBase>"
        b"<csipaus:opModImpLimW><multiplier>0</multiplier><value>7000</value>"
        b"</csipaus:opModImpLimW>"
        b"<csipaus:opModExpLimW><multiplier>-1</multiplier><value>15000</value>"
        b"</csipaus:opModExpLimW>"
        b"</DERControlBase></DERControl>"
    )


def test_der_control_v13_namespace_golden() -> None:
    storage = DERControl(
        mrid="01",
        creation_time=0,
        interval=DateTimeInterval(duration=60, start=0),
        der_control_base=DERControlBase(
            op_mod_connect=True, op_mod_storage_target_w=from_watts(-2500)
        ),
    )
    assert encode(storage, csipaus=CsipAusVersion.V1_3) == (
        b'<DERControl xmlns="urn:ieee:std:2030.5:ns" xmlns:csipaus="https://csipaus.org/ns/v1.3">'
        b"<mRID>01</mRID><creationTime>0</creationTime>"
        b"<interval><duration>60</duration><start>0</start></interval>"
        b"<DERControlBase><opModConnect>true</opModConnect>"
        b"<csipaus:opModStorageTargetW><multiplier>-1</multiplier><value>-25000</value>"
        b"</csipaus:opModStorageTargetW></DERControlBase></DERControl>"
    )
    # The v1.2 namespace does not define opModStorageTargetW: refuse rather than mislabel it.
    with pytest.raises(InvalidValue) as info:
        encode(storage, csipaus=CsipAusVersion.V1_2)
    assert info.value.path == "DERControl/DERControlBase/opModStorageTargetW"


def test_response_golden_without_csipaus_declaration() -> None:
    response = DERControlResponse(
        created_date_time=1795822068,
        end_device_lfdi="F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5",
        status=1,
        subject="30000000000000000000000600000000",
    )
    assert encode(response) == (
        b'<DERControlResponse xmlns="urn:ieee:std:2030.5:ns">'
        b"<createdDateTime>1795822068</createdDateTime>"
        b"<endDeviceLFDI>F0F83B2BC825E617DEBD7192F9305B4B6ABC00F5</endDeviceLFDI>"
        b"<status>1</status><subject>30000000000000000000000600000000</subject>"
        b"</DERControlResponse>"
    )


def test_empty_list_and_empty_control_base_self_close() -> None:
    assert encode(EndDeviceList(href="/edev", all=0, results=0, poll_rate=300)) == (
        b'<EndDeviceList xmlns="urn:ieee:std:2030.5:ns" href="/edev" all="0" results="0"'
        b' pollRate="300"/>'
    )
    default = DefaultDERControl(href="/d", mrid="10", version=0, der_control_base=DERControlBase())
    assert encode(default) == (
        b'<DefaultDERControl xmlns="urn:ieee:std:2030.5:ns" href="/d"><mRID>10</mRID>'
        b"<version>0</version><DERControlBase/></DefaultDERControl>"
    )


def test_connection_point_is_a_csipaus_root() -> None:
    cp = ConnectionPoint(href="/edev/8/cp", connection_point_id="")
    assert encode(cp, csipaus=CsipAusVersion.V1_3) == (
        b'<csipaus:ConnectionPoint xmlns="urn:ieee:std:2030.5:ns"'
        b' xmlns:csipaus="https://csipaus.org/ns/v1.3" href="/edev/8/cp">'
        b"<csipaus:connectionPointId></csipaus:connectionPointId></csipaus:ConnectionPoint>"
    )


def test_notification_writes_xsi_type() -> None:
    notification = Notification(
        subscribed_resource="/derp/1/derc",
        resource=DERControlList(href="/derp/1/derc", all=0, results=0),
        status=0,
        subscription_uri="/edev/0/sub/1",
    )
    assert encode(notification) == (
        b'<Notification xmlns="urn:ieee:std:2030.5:ns"'
        b' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        b"<subscribedResource>/derp/1/derc</subscribedResource>"
        b'<Resource xsi:type="DERControlList" href="/derp/1/derc" all="0" results="0"/>'
        b"<status>0</status><subscriptionURI>/edev/0/sub/1</subscriptionURI></Notification>"
    )
    assert decode(encode(notification)) == notification


def test_text_and_attributes_are_escaped() -> None:
    error = Error(reason_code=0, message='a < b & "c" > d')
    encoded = encode(error)
    assert encoded == (
        b'<Error xmlns="urn:ieee:std:2030.5:ns"><reasonCode>0</reasonCode>'
        b'<message>a &lt; b &amp; "c" &gt; d</message></Error>'
    )
    assert decode(encoded) == error
    linked = DERControlList(href='/a?x="1"&y=<2>', all=0, results=0)
    assert b'href="/a?x=&quot;1&quot;&amp;y=&lt;2&gt;"' in encode(linked)
    assert decode(encode(linked)) == linked


def test_characters_xml_cannot_carry_are_refused() -> None:
    with pytest.raises(InvalidValue) as info:
        encode(Error(reason_code=0, message="bell\x07"))
    assert info.value.path == "Error/message"


def test_only_root_models_encode() -> None:
    with pytest.raises(InvalidValue):
        encode(ActivePower(multiplier=0, value=1))
    with pytest.raises(InvalidValue):
        encode(Link(href="/x"))


# Pricing (IEEE 2030.5-2018 §10.5), after the standard's time-of-use example: a residential
# tariff in US dollars with prices in thousandths of a dollar per kWh.
TARIFF = TariffProfile(
    href="/tp/0",
    mrid="A0" * 16,
    description="TOU Residential",
    currency=840,
    price_power_of_ten_multiplier=-3,
    primacy=1,
    rate_code="R1",
    rate_component_list_link=ListLink(href="/tp/0/rc", all=1),
    service_category_kind=0,
)
RATE = RateComponent(
    href="/tp/0/rc/0",
    mrid="B0" * 16,
    description="Energy",
    active_time_tariff_interval_list_link=ListLink(href="/tp/0/rc/0/acttti", all=1),
    reading_type_link=Link(href="/rt/0"),
    role_flags="0002",
    time_tariff_interval_list_link=ListLink(href="/tp/0/rc/0/tti", all=2),
)
PEAK = TimeTariffInterval(
    href="/tp/0/rc/0/tti/1",
    mrid="C0" * 16,
    description="Peak",
    creation_time=1795822000,
    event_status=EventStatus(current_status=1, date_time=1795822000, potentially_superseded=False),
    interval=DateTimeInterval(duration=14400, start=1795852800),
    consumption_tariff_interval_list_link=ListLink(href="/tp/0/rc/0/tti/1/cti", all=1),
    tou_tier=3,
)
PEAK_PRICE = ConsumptionTariffIntervalList(
    href="/tp/0/rc/0/tti/1/cti",
    all=1,
    results=1,
    items=(
        ConsumptionTariffInterval(
            href="/tp/0/rc/0/tti/1/cti/1", consumption_block=0, price=317, start_value=0
        ),
    ),
)


def test_pricing_golden() -> None:
    assert encode(TARIFF) == (
        b'<TariffProfile xmlns="urn:ieee:std:2030.5:ns" href="/tp/0">'
        b"<mRID>A0A0A0A0A0A0A0A0A0A0A0A0A0A0A0A0</mRID>"
        b"<description>TOU Residential</description>"
        b"<currency>840</currency><pricePowerOfTenMultiplier>-3</pricePowerOfTenMultiplier>"
        b"<primacy>1</primacy><rateCode>R1</rateCode>"
        b'<RateComponentListLink href="/tp/0/rc" all="1"/>'
        b"<serviceCategoryKind>0</serviceCategoryKind></TariffProfile>"
    )
    assert encode(RATE) == (
        b'<RateComponent xmlns="urn:ieee:std:2030.5:ns" href="/tp/0/rc/0">'
        b"<mRID>B0B0B0B0B0B0B0B0B0B0B0B0B0B0B0B0</mRID><description>Energy</description>"
        b'<ActiveTimeTariffIntervalListLink href="/tp/0/rc/0/acttti" all="1"/>'
        b'<ReadingTypeLink href="/rt/0"/><roleFlags>0002</roleFlags>'
        b'<TimeTariffIntervalListLink href="/tp/0/rc/0/tti" all="2"/></RateComponent>'
    )
    assert encode(PEAK) == (
        b'<TimeTariffInterval xmlns="urn:ieee:std:2030.5:ns" href="/tp/0/rc/0/tti/1">'
        b"<mRID>C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0</mRID><description>Peak</description>"
        b"<creationTime>1795822000</creationTime>"
        b"<EventStatus><currentStatus>1</currentStatus><dateTime>1795822000</dateTime>"
        b"<potentiallySuperseded>false</potentiallySuperseded></EventStatus>"
        b"<interval><duration>14400</duration><start>1795852800</start></interval>"
        b'<ConsumptionTariffIntervalListLink href="/tp/0/rc/0/tti/1/cti" all="1"/>'
        b"<touTier>3</touTier></TimeTariffInterval>"
    )
    assert encode(PEAK_PRICE) == (
        b'<ConsumptionTariffIntervalList xmlns="urn:ieee:std:2030.5:ns"'
        b' href="/tp/0/rc/0/tti/1/cti" all="1" results="1">'
        b'<ConsumptionTariffInterval href="/tp/0/rc/0/tti/1/cti/1">'
        b"<consumptionBlock>0</consumptionBlock><price>317</price><startValue>0</startValue>"
        b"</ConsumptionTariffInterval></ConsumptionTariffIntervalList>"
    )
    for model in (TARIFF, RATE, PEAK, PEAK_PRICE):
        assert decode(encode(model)) == model


def test_time_tariff_interval_v13_summary_golden() -> None:
    """CSIP-AUS v1.3 (as envoy serves it): the interval's prices inline and its RateComponent."""
    price = PEAK_PRICE.items[0]
    summarised = PEAK.model_copy(
        update={
            "description": None,
            "consumption_tariff_interval_list_summary": ConsumptionTariffIntervalListSummary(
                all=1, results=1, items=(price,)
            ),
            "rate_component_link": Link(href="/tp/0/rc/0"),
        }
    )
    assert encode(summarised, csipaus=CsipAusVersion.V1_3) == (
        b'<TimeTariffInterval xmlns="urn:ieee:std:2030.5:ns"'
        b' xmlns:csipaus="https://csipaus.org/ns/v1.3" href="/tp/0/rc/0/tti/1">'
        b"<mRID>C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0</mRID>"
        b"<creationTime>1795822000</creationTime>"
        b"<EventStatus><currentStatus>1</currentStatus><dateTime>1795822000</dateTime>"
        b"<potentiallySuperseded>false</potentiallySuperseded></EventStatus>"
        b"<interval><duration>14400</duration><start>1795852800</start></interval>"
        b'<ConsumptionTariffIntervalListLink href="/tp/0/rc/0/tti/1/cti" all="1"/>'
        b"<touTier>3</touTier>"
        b'<csipaus:ConsumptionTariffIntervalListSummary all="1" results="1">'
        b'<ConsumptionTariffInterval href="/tp/0/rc/0/tti/1/cti/1">'
        b"<consumptionBlock>0</consumptionBlock><price>317</price><startValue>0</startValue>"
        b"</ConsumptionTariffInterval></csipaus:ConsumptionTariffIntervalListSummary>"
        b'<RateComponentLink href="/tp/0/rc/0"/></TimeTariffInterval>'
    )
    assert decode(encode(summarised, csipaus=CsipAusVersion.V1_3)) == summarised
    # The IEEE namespace and CSIP-AUS v1.2 have no summary: refuse rather than mislabel it.
    with pytest.raises(InvalidValue):
        encode(summarised, csipaus=CsipAusVersion.V1_2)


def test_demand_response_golden() -> None:
    """DRLC (IEEE 2030.5-2018 §10.4): a program and a thermostat event capping its duty cycle."""
    program = DemandResponseProgram(
        href="/edev/3/drp/1",
        mrid="E0" * 16,
        description="Thermal loads",
        active_end_device_control_list_link=ListLink(href="/edev/3/drp/1/actedc", all=1),
        end_device_control_list_link=ListLink(href="/edev/3/drp/1/edc", all=1),
        primacy=1,
    )
    assert encode(program) == (
        b'<DemandResponseProgram xmlns="urn:ieee:std:2030.5:ns" href="/edev/3/drp/1">'
        b"<mRID>E0E0E0E0E0E0E0E0E0E0E0E0E0E0E0E0</mRID><description>Thermal loads</description>"
        b'<ActiveEndDeviceControlListLink href="/edev/3/drp/1/actedc" all="1"/>'
        b'<EndDeviceControlListLink href="/edev/3/drp/1/edc" all="1"/>'
        b"<primacy>1</primacy></DemandResponseProgram>"
    )
    event = EndDeviceControl(
        href="/edev/3/drp/1/edc/7",
        reply_to="/edev/3/rsps/2/rsp",
        response_required="03",
        mrid="F0" * 16,
        creation_time=1795822000,
        event_status=EventStatus(
            current_status=0, date_time=1795822000, potentially_superseded=False
        ),
        interval=DateTimeInterval(duration=3600, start=1795825600),
        randomize_start=120,
        device_category="01",
        dr_program_mandatory=True,
        duty_cycle=DutyCycle(normal_value=40),
        load_shift_forward=False,
    )
    assert encode(event) == (
        b'<EndDeviceControl xmlns="urn:ieee:std:2030.5:ns" href="/edev/3/drp/1/edc/7"'
        b' replyTo="/edev/3/rsps/2/rsp" responseRequired="03">'
        b"<mRID>F0F0F0F0F0F0F0F0F0F0F0F0F0F0F0F0</mRID><creationTime>1795822000</creationTime>"
        b"<EventStatus><currentStatus>0</currentStatus><dateTime>1795822000</dateTime>"
        b"<potentiallySuperseded>false</potentiallySuperseded></EventStatus>"
        b"<interval><duration>3600</duration><start>1795825600</start></interval>"
        b"<randomizeStart>120</randomizeStart><deviceCategory>01</deviceCategory>"
        b"<drProgramMandatory>true</drProgramMandatory>"
        b"<DutyCycle><normalValue>40</normalValue></DutyCycle>"
        b"<loadShiftForward>false</loadShiftForward></EndDeviceControl>"
    )
    offset = event.model_copy(
        update={
            "duty_cycle": None,
            "offset": Offset(cooling_offset=20, heating_offset=20),
            "interval": DateTimeInterval(duration=1800, start=1795825600),
        }
    )
    listed = EndDeviceControlList(href="/edev/3/drp/1/edc", all=2, results=2, items=(event, offset))
    expected = (
        b"<Offset><coolingOffset>20</coolingOffset><heatingOffset>20</heatingOffset></Offset>"
    )
    assert expected in encode(listed)
    for model in (program, event, listed):
        assert decode(encode(model)) == model
