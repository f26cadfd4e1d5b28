"""Typed models of the IEEE 2030.5 DER function set plus the CSIP-AUS extensions.

Field names are snake_case; the wire name is in each field's ``Element``/``Attribute`` marker.
Field order is the XSD sequence order, because ``encode`` writes fields in declaration order.
Fields the XSD requires are required here too; everything else is optional (``None`` = absent).

Envoy quirks that shaped these models (see the fixtures README):

* ``ListLink.all`` is optional: envoy omits it on several links although the XSD requires it.
* ``FunctionSetAssignments`` has its links *before* ``mRID``/``description`` (XSD-correct; it
  extends FunctionSetAssignmentsBase), so it does not reuse an "identified object first" base.
* ``Error.message`` is not in the XSD, but envoy always sends it.
* ``Response`` and ``DERControlResponse`` are separate roots: the ResponseList holds
  ``<Response>`` children while a single GET returns a ``<DERControlResponse>`` root.
* ``ConnectionPoint`` is a ``csipaus:``-namespaced root; CSIP-AUS 1.1's ``<csipaus:id>`` is read
  as ``connectionPointId`` (envoy still accepts it and serves it back under the new name).
* Hex values keep the sender's case and length (see ``schema._hex``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, ClassVar, Final

from pydantic import SerializeAsAny

from protocols.sep2.schema import (
    CSIPAUS,
    CSIPAUS_V13,
    Attribute,
    Element,
    HexBinary8,
    HexBinary16,
    HexBinary32,
    HexBinary128,
    HexBinary160,
    Int16,
    Int32,
    Int48,
    NsKind,
    PerCent,
    PowerOfTenMultiplier,
    Sep2Model,
    SignedPerCent,
    TimeType,
    UInt8,
    UInt16,
    UInt32,
    UInt48,
    UInt64,
)

__all__ = [
    "DER",
    "ROOT_MODELS",
    "ActivePower",
    "AmpereHour",
    "ApparentPower",
    "ApplianceLoadReduction",
    "Condition",
    "ConnectStatus",
    "ConnectionPoint",
    "ConsumptionTariffInterval",
    "ConsumptionTariffIntervalList",
    "ConsumptionTariffIntervalListSummary",
    "CurrentRMS",
    "DERAvailability",
    "DERCapability",
    "DERControl",
    "DERControlBase",
    "DERControlList",
    "DERControlResponse",
    "DERList",
    "DERProgram",
    "DERProgramList",
    "DERSettings",
    "DERStatus",
    "DateTimeInterval",
    "DefaultDERControl",
    "DemandResponseProgram",
    "DemandResponseProgramList",
    "DeviceCapability",
    "DutyCycle",
    "EndDevice",
    "EndDeviceControl",
    "EndDeviceControlList",
    "EndDeviceList",
    "Error",
    "EventStatus",
    "FixedVar",
    "FreqDroop",
    "FunctionSetAssignments",
    "FunctionSetAssignmentsList",
    "Link",
    "ListLink",
    "LogEvent",
    "LogEventList",
    "ManufacturerStatus",
    "MirrorMeterReading",
    "MirrorMeterReadingList",
    "MirrorReadingSet",
    "MirrorUsagePoint",
    "MirrorUsagePointList",
    "Notification",
    "Offset",
    "PowerFactor",
    "PowerFactorWithExcitation",
    "RateComponent",
    "RateComponentList",
    "ReactivePower",
    "ReactiveSusceptance",
    "Reading",
    "ReadingType",
    "Registration",
    "Resource",
    "Response",
    "ResponseList",
    "ResponseSet",
    "ResponseSetList",
    "Sep2List",
    "SetPoint",
    "StateOfChargeStatus",
    "StatusCode",
    "Subscription",
    "SubscriptionList",
    "TariffProfile",
    "TariffProfileList",
    "Time",
    "TimeTariffInterval",
    "TimeTariffIntervalList",
    "VoltageRMS",
    "WattHour",
]

# --------------------------------------------------------------------------- links and bases


class Link(Sep2Model):
    """A reference to a resource by server-relative href. Treat hrefs as opaque."""

    href: Annotated[str, Attribute("href")]


class ListLink(Link):
    """A reference to a list; ``all`` is the list's size (optional: envoy often omits it)."""

    all: Annotated[UInt32 | None, Attribute("all")] = None


class Resource(Sep2Model):
    """Anything with an ``href`` (absent in request bodies)."""

    href: Annotated[str | None, Attribute("href")] = None


class Sep2List(Resource):
    """Common attributes of every 2030.5 list; subclasses add ``items``.

    ``all`` is the size of the whole list and ``results`` the number in this page. Envoy always
    sends both; ``subscribable`` and ``pollRate`` appear only on some lists.
    """

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    all: Annotated[UInt32, Attribute("all")]
    results: Annotated[UInt32, Attribute("results")]
    poll_rate: Annotated[UInt32 | None, Attribute("pollRate")] = None


# --------------------------------------------------------------------------- unit value types


class ActivePower(Sep2Model):
    """Watts as ``value × 10^multiplier``. Use ``to_watts``/``from_watts``.

    Envoy picks the multiplier per value (it raises it until the value fits in Int16), so one
    DERControlBase can mix multipliers: never assume a fixed one.
    """

    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]
    value: Annotated[Int16, Element("value")]


class ApparentPower(Sep2Model):
    """Volt-amperes as ``value × 10^multiplier``."""

    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]
    value: Annotated[UInt16, Element("value")]


class ReactivePower(Sep2Model):
    """Vars as ``value × 10^multiplier``."""

    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]
    value: Annotated[Int16, Element("value")]


class CurrentRMS(Sep2Model):
    """Amperes as ``value × 10^multiplier``."""

    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]
    value: Annotated[UInt16, Element("value")]


class VoltageRMS(Sep2Model):
    """Volts as ``value × 10^multiplier``."""

    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]
    value: Annotated[UInt16, Element("value")]


class WattHour(Sep2Model):
    """Watt-hours as ``value × 10^multiplier``."""

    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]
    value: Annotated[UInt16, Element("value")]


class AmpereHour(Sep2Model):
    """Ampere-hours as ``value × 10^multiplier``."""

    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]
    value: Annotated[UInt16, Element("value")]


class ReactiveSusceptance(Sep2Model):
    """Siemens as ``value × 10^multiplier``."""

    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]
    value: Annotated[UInt16, Element("value")]


class PowerFactor(Sep2Model):
    """Displacement power factor as ``displacement × 10^multiplier``."""

    displacement: Annotated[UInt16, Element("displacement")]
    multiplier: Annotated[PowerOfTenMultiplier, Element("multiplier")]


class PowerFactorWithExcitation(Sep2Model):
    """Power factor in hundredths with the excitation direction (true = over-excited)."""

    displacement: Annotated[UInt16, Element("displacement")]
    excitation: Annotated[bool, Element("excitation")]


class FixedVar(Sep2Model):
    """Reactive power set point in hundredths of a percent of ``refType``."""

    ref_type: Annotated[UInt8, Element("refType")]
    value: Annotated[SignedPerCent, Element("value")]


class FreqDroop(Sep2Model):
    """Parameterised frequency-watt droop (FreqDroopType)."""

    d_bof: Annotated[UInt32, Element("dBOF")]
    d_buf: Annotated[UInt32, Element("dBUF")]
    k_of: Annotated[UInt16, Element("kOF")]
    k_uf: Annotated[UInt16, Element("kUF")]
    open_loop_tms: Annotated[UInt16, Element("openLoopTms")]


# --------------------------------------------------------------------------- discovery


class DeviceCapability(Resource):
    """``/dcap``: the entry point. ``pollRate`` is absent before registration (envoy)."""

    xml_tag: ClassVar[str] = "DeviceCapability"

    poll_rate: Annotated[UInt32 | None, Attribute("pollRate")] = None
    customer_account_list_link: Annotated[ListLink | None, Element("CustomerAccountListLink")] = (
        None
    )
    demand_response_program_list_link: Annotated[
        ListLink | None, Element("DemandResponseProgramListLink")
    ] = None
    der_program_list_link: Annotated[ListLink | None, Element("DERProgramListLink")] = None
    file_list_link: Annotated[ListLink | None, Element("FileListLink")] = None
    messaging_program_list_link: Annotated[ListLink | None, Element("MessagingProgramListLink")] = (
        None
    )
    prepayment_list_link: Annotated[ListLink | None, Element("PrepaymentListLink")] = None
    response_set_list_link: Annotated[ListLink | None, Element("ResponseSetListLink")] = None
    tariff_profile_list_link: Annotated[ListLink | None, Element("TariffProfileListLink")] = None
    time_link: Annotated[Link | None, Element("TimeLink")] = None
    usage_point_list_link: Annotated[ListLink | None, Element("UsagePointListLink")] = None
    end_device_list_link: Annotated[ListLink | None, Element("EndDeviceListLink")] = None
    mirror_usage_point_list_link: Annotated[
        ListLink | None, Element("MirrorUsagePointListLink")
    ] = None
    self_device_link: Annotated[Link | None, Element("SelfDeviceLink")] = None


class Time(Resource):
    """``/tm``: the server's clock. Use it to estimate the local clock offset."""

    xml_tag: ClassVar[str] = "Time"

    current_time: Annotated[TimeType, Element("currentTime")]
    dst_end_time: Annotated[TimeType, Element("dstEndTime")]
    dst_offset: Annotated[TimeType, Element("dstOffset")]
    dst_start_time: Annotated[TimeType, Element("dstStartTime")]
    local_time: Annotated[TimeType | None, Element("localTime")] = None
    quality: Annotated[UInt8, Element("quality")]
    tz_offset: Annotated[TimeType, Element("tzOffset")]


# --------------------------------------------------------------------------- end devices


class EndDevice(Resource):
    """A client device (or an aggregator's virtual device ``/edev/0``).

    ``lfdi`` keeps the sender's case (uppercase for envoy's device A, lowercase for its seed
    sites); compare with ``identity.same_lfdi``. ``sfdi`` is not check-digit validated here:
    envoy's seed devices have SFDIs such as 2222 whose check digit is wrong.
    """

    xml_tag: ClassVar[str] = "EndDevice"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    configuration_link: Annotated[Link | None, Element("ConfigurationLink")] = None
    der_list_link: Annotated[ListLink | None, Element("DERListLink")] = None
    device_category: Annotated[HexBinary32 | None, Element("deviceCategory")] = None
    device_information_link: Annotated[Link | None, Element("DeviceInformationLink")] = None
    device_status_link: Annotated[Link | None, Element("DeviceStatusLink")] = None
    file_status_link: Annotated[Link | None, Element("FileStatusLink")] = None
    ip_interface_list_link: Annotated[ListLink | None, Element("IPInterfaceListLink")] = None
    lfdi: Annotated[HexBinary160 | None, Element("lFDI")] = None
    load_shed_availability_list_link: Annotated[
        ListLink | None, Element("LoadShedAvailabilityListLink")
    ] = None
    log_event_list_link: Annotated[ListLink | None, Element("LogEventListLink")] = None
    power_status_link: Annotated[Link | None, Element("PowerStatusLink")] = None
    sfdi: Annotated[UInt64, Element("sFDI")]
    changed_time: Annotated[TimeType, Element("changedTime")]
    enabled: Annotated[bool | None, Element("enabled")] = None
    flow_reservation_request_list_link: Annotated[
        ListLink | None, Element("FlowReservationRequestListLink")
    ] = None
    flow_reservation_response_list_link: Annotated[
        ListLink | None, Element("FlowReservationResponseListLink")
    ] = None
    function_set_assignments_list_link: Annotated[
        ListLink | None, Element("FunctionSetAssignmentsListLink")
    ] = None
    post_rate: Annotated[UInt32 | None, Element("postRate")] = None
    registration_link: Annotated[Link | None, Element("RegistrationLink")] = None
    subscription_list_link: Annotated[ListLink | None, Element("SubscriptionListLink")] = None
    connection_point_link: Annotated[Link | None, Element("ConnectionPointLink", CSIPAUS)] = None


class EndDeviceList(Sep2List):
    xml_tag: ClassVar[str] = "EndDeviceList"

    items: Annotated[tuple[EndDevice, ...], Element("EndDevice")] = ()


class Registration(Resource):
    """The registration PIN (with its check digit: envoy's static 11111 is served as 111115)."""

    xml_tag: ClassVar[str] = "Registration"

    date_time_registered: Annotated[TimeType, Element("dateTimeRegistered")]
    pin: Annotated[UInt32, Element("pIN")]


class ConnectionPoint(Resource):
    """CSIP-AUS site connection point (the NMI in Australia); a ``csipaus:`` root element."""

    xml_tag: ClassVar[str] = "ConnectionPoint"
    xml_ns: ClassVar[NsKind] = CSIPAUS

    # Envoy before any PUT serves an empty <connectionPointId></connectionPointId>: "" here.
    connection_point_id: Annotated[
        str | None, Element("connectionPointId", CSIPAUS, aliases=("id",))
    ] = None


class FunctionSetAssignments(Resource):
    """A group of function sets; its links come *before* mRID (XSD order, see module doc)."""

    xml_tag: ClassVar[str] = "FunctionSetAssignments"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    customer_account_list_link: Annotated[ListLink | None, Element("CustomerAccountListLink")] = (
        None
    )
    demand_response_program_list_link: Annotated[
        ListLink | None, Element("DemandResponseProgramListLink")
    ] = None
    der_program_list_link: Annotated[ListLink | None, Element("DERProgramListLink")] = None
    file_list_link: Annotated[ListLink | None, Element("FileListLink")] = None
    messaging_program_list_link: Annotated[ListLink | None, Element("MessagingProgramListLink")] = (
        None
    )
    prepayment_list_link: Annotated[ListLink | None, Element("PrepaymentListLink")] = None
    response_set_list_link: Annotated[ListLink | None, Element("ResponseSetListLink")] = None
    tariff_profile_list_link: Annotated[ListLink | None, Element("TariffProfileListLink")] = None
    time_link: Annotated[Link | None, Element("TimeLink")] = None
    usage_point_list_link: Annotated[ListLink | None, Element("UsagePointListLink")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None


class FunctionSetAssignmentsList(Sep2List):
    xml_tag: ClassVar[str] = "FunctionSetAssignmentsList"

    items: Annotated[tuple[FunctionSetAssignments, ...], Element("FunctionSetAssignments")] = ()


# --------------------------------------------------------------------------- DER programs


class DERProgram(Resource):
    """A program of DER controls; lower ``primacy`` wins."""

    xml_tag: ClassVar[str] = "DERProgram"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    active_der_control_list_link: Annotated[
        ListLink | None, Element("ActiveDERControlListLink")
    ] = None
    default_der_control_link: Annotated[Link | None, Element("DefaultDERControlLink")] = None
    der_control_list_link: Annotated[ListLink | None, Element("DERControlListLink")] = None
    der_curve_list_link: Annotated[ListLink | None, Element("DERCurveListLink")] = None
    primacy: Annotated[UInt8, Element("primacy")]


class DERProgramList(Sep2List):
    """Also the AssociatedDERProgramList of a DER (same root element)."""

    xml_tag: ClassVar[str] = "DERProgramList"

    items: Annotated[tuple[DERProgram, ...], Element("DERProgram")] = ()


class DERControlBase(Sep2Model):
    """The control values. Absent = no limit/no change for that function.

    Unknown children are an *error* here (``strict_children``): silently dropping a control we
    do not understand would leave a device unconstrained, so the caller must see it (and can
    answer with a "not supported" Response). The CSIP-AUS limits come after all 2030.5
    elements, as in the CSIP-AUS XSD and in envoy's output.
    """

    strict_children: ClassVar[bool] = True

    op_mod_connect: Annotated[bool | None, Element("opModConnect")] = None
    op_mod_energize: Annotated[bool | None, Element("opModEnergize")] = None
    op_mod_fixed_pf_absorb_w: Annotated[
        PowerFactorWithExcitation | None, Element("opModFixedPFAbsorbW")
    ] = None
    op_mod_fixed_pf_inject_w: Annotated[
        PowerFactorWithExcitation | None, Element("opModFixedPFInjectW")
    ] = None
    op_mod_fixed_var: Annotated[FixedVar | None, Element("opModFixedVar")] = None
    op_mod_fixed_w: Annotated[SignedPerCent | None, Element("opModFixedW")] = None
    """Hundredths of a percent of rated max W (5000 = 50 %), not watts."""
    op_mod_freq_droop: Annotated[FreqDroop | None, Element("opModFreqDroop")] = None
    op_mod_freq_watt: Annotated[Link | None, Element("opModFreqWatt")] = None
    op_mod_hfrt_may_trip: Annotated[Link | None, Element("opModHFRTMayTrip")] = None
    op_mod_hfrt_must_trip: Annotated[Link | None, Element("opModHFRTMustTrip")] = None
    op_mod_hvrt_may_trip: Annotated[Link | None, Element("opModHVRTMayTrip")] = None
    op_mod_hvrt_momentary_cessation: Annotated[
        Link | None, Element("opModHVRTMomentaryCessation")
    ] = None
    op_mod_hvrt_must_trip: Annotated[Link | None, Element("opModHVRTMustTrip")] = None
    op_mod_lfrt_may_trip: Annotated[Link | None, Element("opModLFRTMayTrip")] = None
    op_mod_lfrt_must_trip: Annotated[Link | None, Element("opModLFRTMustTrip")] = None
    op_mod_lvrt_may_trip: Annotated[Link | None, Element("opModLVRTMayTrip")] = None
    op_mod_lvrt_momentary_cessation: Annotated[
        Link | None, Element("opModLVRTMomentaryCessation")
    ] = None
    op_mod_lvrt_must_trip: Annotated[Link | None, Element("opModLVRTMustTrip")] = None
    op_mod_max_lim_w: Annotated[PerCent | None, Element("opModMaxLimW")] = None
    """Hundredths of a percent of rated max W, not watts."""
    op_mod_target_var: Annotated[ReactivePower | None, Element("opModTargetVar")] = None
    op_mod_target_w: Annotated[ActivePower | None, Element("opModTargetW")] = None
    op_mod_volt_var: Annotated[Link | None, Element("opModVoltVar")] = None
    op_mod_volt_watt: Annotated[Link | None, Element("opModVoltWatt")] = None
    op_mod_watt_pf: Annotated[Link | None, Element("opModWattPF")] = None
    op_mod_watt_var: Annotated[Link | None, Element("opModWattVar")] = None
    ramp_tms: Annotated[UInt16 | None, Element("rampTms")] = None
    """Hundredths of a second (3000 = 30 s)."""
    op_mod_imp_lim_w: Annotated[ActivePower | None, Element("opModImpLimW", CSIPAUS)] = None
    """Site import limit at the connection point."""
    op_mod_exp_lim_w: Annotated[ActivePower | None, Element("opModExpLimW", CSIPAUS)] = None
    """Site export limit at the connection point."""
    op_mod_gen_lim_w: Annotated[ActivePower | None, Element("opModGenLimW", CSIPAUS)] = None
    """Device generation limit."""
    op_mod_load_lim_w: Annotated[ActivePower | None, Element("opModLoadLimW", CSIPAUS)] = None
    """Device load limit."""
    op_mod_storage_target_w: Annotated[
        ActivePower | None, Element("opModStorageTargetW", CSIPAUS_V13)
    ] = None
    """CSIP-AUS v1.3 only: storage charge (+)/discharge (-) target."""


class DateTimeInterval(Sep2Model):
    """``start`` (epoch seconds) and ``duration`` (seconds)."""

    duration: Annotated[UInt32, Element("duration")]
    start: Annotated[TimeType, Element("start")]


class EventStatus(Sep2Model):
    """0 scheduled, 1 active, 2 cancelled, 3 cancelled with randomization, 4 superseded.

    Envoy rewrites ``dateTime`` (and the control's ``creationTime``) when it cancels or
    supersedes; ``potentiallySuperseded`` is always false there.
    """

    current_status: Annotated[UInt8, Element("currentStatus")]
    date_time: Annotated[TimeType, Element("dateTime")]
    potentially_superseded: Annotated[bool, Element("potentiallySuperseded")]
    potentially_superseded_time: Annotated[
        TimeType | None, Element("potentiallySupersededTime")
    ] = None
    reason: Annotated[str | None, Element("reason")] = None


class DERControl(Resource):
    """A scheduled DER event. Use ``interval.start``; envoy's ``description`` is a local time."""

    xml_tag: ClassVar[str] = "DERControl"

    reply_to: Annotated[str | None, Attribute("replyTo")] = None
    response_required: Annotated[HexBinary8 | None, Attribute("responseRequired")] = None
    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    creation_time: Annotated[TimeType, Element("creationTime")]
    event_status: Annotated[EventStatus | None, Element("EventStatus")] = None
    interval: Annotated[DateTimeInterval, Element("interval")]
    randomize_duration: Annotated[Int16 | None, Element("randomizeDuration")] = None
    randomize_start: Annotated[Int16 | None, Element("randomizeStart")] = None
    der_control_base: Annotated[DERControlBase, Element("DERControlBase")]
    device_category: Annotated[HexBinary32 | None, Element("deviceCategory")] = None


class DERControlList(Sep2List):
    """Also the ActiveDERControlList (envoy uses the same root element, href ``…/actderc``)."""

    xml_tag: ClassVar[str] = "DERControlList"

    items: Annotated[tuple[DERControl, ...], Element("DERControl")] = ()


class DefaultDERControl(Resource):
    """What applies when no event is active. Envoy serves an empty DERControlBase, not 404,
    for a program without a default."""

    xml_tag: ClassVar[str] = "DefaultDERControl"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    der_control_base: Annotated[DERControlBase, Element("DERControlBase")]
    set_es_delay: Annotated[UInt32 | None, Element("setESDelay")] = None
    set_es_high_freq: Annotated[UInt16 | None, Element("setESHighFreq")] = None
    set_es_high_volt: Annotated[Int16 | None, Element("setESHighVolt")] = None
    set_es_low_freq: Annotated[UInt16 | None, Element("setESLowFreq")] = None
    set_es_low_volt: Annotated[Int16 | None, Element("setESLowVolt")] = None
    set_es_ramp_tms: Annotated[UInt32 | None, Element("setESRampTms")] = None
    set_es_random_delay: Annotated[UInt32 | None, Element("setESRandomDelay")] = None
    set_grad_w: Annotated[UInt16 | None, Element("setGradW")] = None
    """Hundredths of a percent of rated W per second (envoy passes its "ramp rate" through)."""
    set_soft_grad_w: Annotated[UInt16 | None, Element("setSoftGradW")] = None


# --------------------------------------------------------------------------- DER resources


class DER(Resource):
    """One DER of an EndDevice: links to its capability, settings, status and availability."""

    xml_tag: ClassVar[str] = "DER"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    associated_der_program_list_link: Annotated[
        ListLink | None, Element("AssociatedDERProgramListLink")
    ] = None
    associated_usage_point_link: Annotated[Link | None, Element("AssociatedUsagePointLink")] = None
    current_der_program_link: Annotated[Link | None, Element("CurrentDERProgramLink")] = None
    der_availability_link: Annotated[Link | None, Element("DERAvailabilityLink")] = None
    der_capability_link: Annotated[Link | None, Element("DERCapabilityLink")] = None
    der_settings_link: Annotated[Link | None, Element("DERSettingsLink")] = None
    der_status_link: Annotated[Link | None, Element("DERStatusLink")] = None


class DERList(Sep2List):
    xml_tag: ClassVar[str] = "DERList"

    items: Annotated[tuple[DER, ...], Element("DER")] = ()


class DERCapability(Resource):
    """Nameplate ratings. ``rtg_max_w`` is the base of opModMaxLimW/opModFixedW percentages."""

    xml_tag: ClassVar[str] = "DERCapability"

    modes_supported: Annotated[HexBinary32, Element("modesSupported")]
    rtg_abnormal_category: Annotated[UInt8 | None, Element("rtgAbnormalCategory")] = None
    rtg_max_a: Annotated[CurrentRMS | None, Element("rtgMaxA")] = None
    rtg_max_ah: Annotated[AmpereHour | None, Element("rtgMaxAh")] = None
    rtg_max_charge_rate_va: Annotated[ApparentPower | None, Element("rtgMaxChargeRateVA")] = None
    rtg_max_charge_rate_w: Annotated[ActivePower | None, Element("rtgMaxChargeRateW")] = None
    rtg_max_discharge_rate_va: Annotated[ApparentPower | None, Element("rtgMaxDischargeRateVA")] = (
        None
    )
    rtg_max_discharge_rate_w: Annotated[ActivePower | None, Element("rtgMaxDischargeRateW")] = None
    rtg_max_v: Annotated[VoltageRMS | None, Element("rtgMaxV")] = None
    rtg_max_va: Annotated[ApparentPower | None, Element("rtgMaxVA")] = None
    rtg_max_var: Annotated[ReactivePower | None, Element("rtgMaxVar")] = None
    rtg_max_var_neg: Annotated[ReactivePower | None, Element("rtgMaxVarNeg")] = None
    rtg_max_w: Annotated[ActivePower, Element("rtgMaxW")]
    rtg_max_wh: Annotated[WattHour | None, Element("rtgMaxWh")] = None
    rtg_min_pf_over_excited: Annotated[PowerFactor | None, Element("rtgMinPFOverExcited")] = None
    rtg_min_pf_under_excited: Annotated[PowerFactor | None, Element("rtgMinPFUnderExcited")] = None
    rtg_min_v: Annotated[VoltageRMS | None, Element("rtgMinV")] = None
    rtg_normal_category: Annotated[UInt8 | None, Element("rtgNormalCategory")] = None
    rtg_over_excited_pf: Annotated[PowerFactor | None, Element("rtgOverExcitedPF")] = None
    rtg_over_excited_w: Annotated[ActivePower | None, Element("rtgOverExcitedW")] = None
    rtg_reactive_susceptance: Annotated[
        ReactiveSusceptance | None, Element("rtgReactiveSusceptance")
    ] = None
    rtg_under_excited_pf: Annotated[PowerFactor | None, Element("rtgUnderExcitedPF")] = None
    rtg_under_excited_w: Annotated[ActivePower | None, Element("rtgUnderExcitedW")] = None
    rtg_v_nom: Annotated[VoltageRMS | None, Element("rtgVNom")] = None
    type: Annotated[UInt8, Element("type")]
    doe_modes_supported: Annotated[HexBinary32 | None, Element("doeModesSupported", CSIPAUS)] = None
    vpp_modes_supported: Annotated[
        HexBinary32 | None, Element("vppModesSupported", CSIPAUS_V13)
    ] = None


class DERSettings(Resource):
    """Settings in effect on the DER (may be lower than the nameplate)."""

    xml_tag: ClassVar[str] = "DERSettings"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    modes_enabled: Annotated[HexBinary32 | None, Element("modesEnabled")] = None
    set_es_delay: Annotated[UInt32 | None, Element("setESDelay")] = None
    set_es_high_freq: Annotated[UInt16 | None, Element("setESHighFreq")] = None
    set_es_high_volt: Annotated[Int16 | None, Element("setESHighVolt")] = None
    set_es_low_freq: Annotated[UInt16 | None, Element("setESLowFreq")] = None
    set_es_low_volt: Annotated[Int16 | None, Element("setESLowVolt")] = None
    set_es_ramp_tms: Annotated[UInt32 | None, Element("setESRampTms")] = None
    set_es_random_delay: Annotated[UInt32 | None, Element("setESRandomDelay")] = None
    set_grad_w: Annotated[UInt16, Element("setGradW")]
    set_max_a: Annotated[CurrentRMS | None, Element("setMaxA")] = None
    set_max_ah: Annotated[AmpereHour | None, Element("setMaxAh")] = None
    set_max_charge_rate_va: Annotated[ApparentPower | None, Element("setMaxChargeRateVA")] = None
    set_max_charge_rate_w: Annotated[ActivePower | None, Element("setMaxChargeRateW")] = None
    set_max_discharge_rate_va: Annotated[ApparentPower | None, Element("setMaxDischargeRateVA")] = (
        None
    )
    set_max_discharge_rate_w: Annotated[ActivePower | None, Element("setMaxDischargeRateW")] = None
    set_max_v: Annotated[VoltageRMS | None, Element("setMaxV")] = None
    set_max_va: Annotated[ApparentPower | None, Element("setMaxVA")] = None
    set_max_var: Annotated[ReactivePower | None, Element("setMaxVar")] = None
    set_max_var_neg: Annotated[ReactivePower | None, Element("setMaxVarNeg")] = None
    set_max_w: Annotated[ActivePower, Element("setMaxW")]
    set_max_wh: Annotated[WattHour | None, Element("setMaxWh")] = None
    set_min_pf_over_excited: Annotated[PowerFactor | None, Element("setMinPFOverExcited")] = None
    set_min_pf_under_excited: Annotated[PowerFactor | None, Element("setMinPFUnderExcited")] = None
    set_min_v: Annotated[VoltageRMS | None, Element("setMinV")] = None
    set_soft_grad_w: Annotated[UInt16 | None, Element("setSoftGradW")] = None
    set_v_nom: Annotated[VoltageRMS | None, Element("setVNom")] = None
    set_v_ref: Annotated[VoltageRMS | None, Element("setVRef")] = None
    set_v_ref_ofs: Annotated[VoltageRMS | None, Element("setVRefOfs")] = None
    updated_time: Annotated[TimeType, Element("updatedTime")]
    doe_modes_enabled: Annotated[HexBinary32 | None, Element("doeModesEnabled", CSIPAUS)] = None
    vpp_modes_enabled: Annotated[HexBinary32 | None, Element("vppModesEnabled", CSIPAUS_V13)] = None
    set_min_wh: Annotated[WattHour | None, Element("setMinWh", CSIPAUS_V13)] = None


class ConnectStatus(Sep2Model):
    """Connection status bit field (hex) with the time it was observed."""

    date_time: Annotated[TimeType, Element("dateTime")]
    value: Annotated[HexBinary8, Element("value")]


class StatusCode(Sep2Model):
    """An enumerated status (inverter, local control mode, operational mode, storage mode)."""

    date_time: Annotated[TimeType, Element("dateTime")]
    value: Annotated[UInt8, Element("value")]


class ManufacturerStatus(Sep2Model):
    """Free-text manufacturer status (String6 in the XSD)."""

    date_time: Annotated[TimeType, Element("dateTime")]
    value: Annotated[str, Element("value")]


class StateOfChargeStatus(Sep2Model):
    """State of charge in hundredths of a percent."""

    date_time: Annotated[TimeType, Element("dateTime")]
    value: Annotated[PerCent, Element("value")]


class DERStatus(Resource):
    """Live DER status. Envoy serves ``alarmStatus`` PUT as ``00000000`` back as ``00``."""

    xml_tag: ClassVar[str] = "DERStatus"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    alarm_status: Annotated[HexBinary32 | None, Element("alarmStatus")] = None
    gen_connect_status: Annotated[ConnectStatus | None, Element("genConnectStatus")] = None
    inverter_status: Annotated[StatusCode | None, Element("inverterStatus")] = None
    local_control_mode_status: Annotated[StatusCode | None, Element("localControlModeStatus")] = (
        None
    )
    manufacturer_status: Annotated[ManufacturerStatus | None, Element("manufacturerStatus")] = None
    operational_mode_status: Annotated[StatusCode | None, Element("operationalModeStatus")] = None
    reading_time: Annotated[TimeType, Element("readingTime")]
    state_of_charge_status: Annotated[
        StateOfChargeStatus | None, Element("stateOfChargeStatus")
    ] = None
    storage_mode_status: Annotated[StatusCode | None, Element("storageModeStatus")] = None
    stor_connect_status: Annotated[ConnectStatus | None, Element("storConnectStatus")] = None


class DERAvailability(Resource):
    """What the DER can deliver now (reserve, available W/var)."""

    xml_tag: ClassVar[str] = "DERAvailability"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    availability_duration: Annotated[UInt32 | None, Element("availabilityDuration")] = None
    max_charge_duration: Annotated[UInt32 | None, Element("maxChargeDuration")] = None
    reading_time: Annotated[TimeType, Element("readingTime")]
    reserve_charge_percent: Annotated[PerCent | None, Element("reserveChargePercent")] = None
    reserve_percent: Annotated[PerCent | None, Element("reservePercent")] = None
    stat_var_avail: Annotated[ReactivePower | None, Element("statVarAvail")] = None
    stat_w_avail: Annotated[ActivePower | None, Element("statWAvail")] = None


# --------------------------------------------------------------------------- metering mirror


class ReadingType(Resource):
    """Units and meaning of readings (uom 38 = W, 63 = var, 29 = V, 33 = Hz, 72 = Wh)."""

    xml_tag: ClassVar[str] = "ReadingType"

    accumulation_behaviour: Annotated[UInt8 | None, Element("accumulationBehaviour")] = None
    commodity: Annotated[UInt8 | None, Element("commodity")] = None
    data_qualifier: Annotated[UInt8 | None, Element("dataQualifier")] = None
    flow_direction: Annotated[UInt8 | None, Element("flowDirection")] = None
    interval_length: Annotated[UInt32 | None, Element("intervalLength")] = None
    kind: Annotated[UInt8 | None, Element("kind")] = None
    max_number_of_intervals: Annotated[UInt8 | None, Element("maxNumberOfIntervals")] = None
    number_of_consumption_blocks: Annotated[UInt8 | None, Element("numberOfConsumptionBlocks")] = (
        None
    )
    number_of_tou_tiers: Annotated[UInt8 | None, Element("numberOfTouTiers")] = None
    phase: Annotated[UInt8 | None, Element("phase")] = None
    power_of_ten_multiplier: Annotated[
        PowerOfTenMultiplier | None, Element("powerOfTenMultiplier")
    ] = None
    sub_interval_length: Annotated[UInt32 | None, Element("subIntervalLength")] = None
    supply_limit: Annotated[UInt48 | None, Element("supplyLimit")] = None
    tiered_consumption_blocks: Annotated[bool | None, Element("tieredConsumptionBlocks")] = None
    uom: Annotated[UInt8 | None, Element("uom")] = None


class Reading(Resource):
    """One reading: ``value × 10^ReadingType.powerOfTenMultiplier`` in ``ReadingType.uom``."""

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    consumption_block: Annotated[UInt8 | None, Element("consumptionBlock")] = None
    quality_flags: Annotated[HexBinary16 | None, Element("qualityFlags")] = None
    time_period: Annotated[DateTimeInterval | None, Element("timePeriod")] = None
    tou_tier: Annotated[UInt8 | None, Element("touTier")] = None
    value: Annotated[Int48 | None, Element("value")] = None
    local_id: Annotated[HexBinary16 | None, Element("localID")] = None


class MirrorReadingSet(Resource):
    """A batch of readings over ``time_period``."""

    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    time_period: Annotated[DateTimeInterval, Element("timePeriod")]
    readings: Annotated[tuple[Reading, ...], Element("Reading")] = ()


class MirrorMeterReading(Resource):
    """One measured quantity of a mirror usage point, with a single reading or reading sets."""

    xml_tag: ClassVar[str] = "MirrorMeterReading"

    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    last_update_time: Annotated[TimeType | None, Element("lastUpdateTime")] = None
    next_update_time: Annotated[TimeType | None, Element("nextUpdateTime")] = None
    mirror_reading_sets: Annotated[tuple[MirrorReadingSet, ...], Element("MirrorReadingSet")] = ()
    reading: Annotated[Reading | None, Element("Reading")] = None
    reading_type: Annotated[ReadingType | None, Element("ReadingType")] = None


class MirrorMeterReadingList(Sep2List):
    """A batched upload of several MirrorMeterReadings (envoy accepts it on ``POST /mup/{id}``)."""

    xml_tag: ClassVar[str] = "MirrorMeterReadingList"

    # Required by the schema, but envoy accepts an upload without them, and so do we: a client
    # posting readings is not paging through anything.
    all: Annotated[UInt32 | None, Attribute("all")] = None  # type: ignore[assignment]
    results: Annotated[UInt32 | None, Attribute("results")] = None  # type: ignore[assignment]
    items: Annotated[tuple[MirrorMeterReading, ...], Element("MirrorMeterReading")] = ()


class MirrorUsagePoint(Resource):
    """Where a client mirrors its meter data (roleFlags 03 = site, 49 = DER)."""

    xml_tag: ClassVar[str] = "MirrorUsagePoint"

    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    role_flags: Annotated[HexBinary16, Element("roleFlags")]
    service_category_kind: Annotated[UInt8, Element("serviceCategoryKind")]
    status: Annotated[UInt8, Element("status")]
    device_lfdi: Annotated[HexBinary160, Element("deviceLFDI")]
    mirror_meter_readings: Annotated[
        tuple[MirrorMeterReading, ...], Element("MirrorMeterReading")
    ] = ()
    post_rate: Annotated[UInt32 | None, Element("postRate")] = None


class MirrorUsagePointList(Sep2List):
    xml_tag: ClassVar[str] = "MirrorUsagePointList"

    items: Annotated[tuple[MirrorUsagePoint, ...], Element("MirrorUsagePoint")] = ()


# --------------------------------------------------------------------------- responses


class Response(Resource):
    """Event feedback: status 1 received, 2 started, 3 completed, 6 cancelled, 7 superseded,
    252-254 rejected. ``subject`` is the event's mRID, echoed as sent."""

    xml_tag: ClassVar[str] = "Response"

    created_date_time: Annotated[TimeType | None, Element("createdDateTime")] = None
    end_device_lfdi: Annotated[HexBinary160, Element("endDeviceLFDI")]
    status: Annotated[UInt8 | None, Element("status")] = None
    subject: Annotated[HexBinary128, Element("subject")]


class DERControlResponse(Response):
    """A Response to a DERControl (the root of a single GET and of a client's POST)."""

    xml_tag: ClassVar[str] = "DERControlResponse"


class ResponseList(Sep2List):
    xml_tag: ClassVar[str] = "ResponseList"

    items: Annotated[tuple[Response, ...], Element("Response")] = ()


class ResponseSet(Resource):
    """A set of responses (envoy has one per function set: ``price``, ``site_control``)."""

    xml_tag: ClassVar[str] = "ResponseSet"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    response_list_link: Annotated[ListLink | None, Element("ResponseListLink")] = None


class ResponseSetList(Sep2List):
    xml_tag: ClassVar[str] = "ResponseSetList"

    items: Annotated[tuple[ResponseSet, ...], Element("ResponseSet")] = ()


# --------------------------------------------------------------------------- subscriptions


class Condition(Sep2Model):
    """Notify only when ``attributeIdentifier`` leaves [lower, upper]."""

    attribute_identifier: Annotated[UInt8, Element("attributeIdentifier")]
    lower_threshold: Annotated[Int48, Element("lowerThreshold")]
    upper_threshold: Annotated[Int48, Element("upperThreshold")]


class Subscription(Resource):
    """A request to be notified at ``notification_uri`` when ``subscribed_resource`` changes."""

    xml_tag: ClassVar[str] = "Subscription"

    subscribed_resource: Annotated[str, Element("subscribedResource")]
    condition: Annotated[Condition | None, Element("Condition")] = None
    encoding: Annotated[UInt8, Element("encoding")]
    level: Annotated[str, Element("level")]
    limit: Annotated[UInt32, Element("limit")]
    notification_uri: Annotated[str, Element("notificationURI")]


class SubscriptionList(Sep2List):
    xml_tag: ClassVar[str] = "SubscriptionList"

    items: Annotated[tuple[Subscription, ...], Element("Subscription")] = ()


class Notification(Resource):
    """A pushed change. ``resource`` is any root model, chosen by ``xsi:type`` on the wire.

    Envoy sends ``status`` 4 ("subscription cancelled, resource deleted") when a control in a
    subscribed list is *cancelled*, while the subscription stays active: do not read status 4
    from envoy as the end of the subscription.
    """

    xml_tag: ClassVar[str] = "Notification"

    subscribed_resource: Annotated[str, Element("subscribedResource")]
    new_resource_uri: Annotated[str | None, Element("newResourceURI")] = None
    # SerializeAsAny: model_dump/JSON must write the concrete resource, not the empty base.
    resource: Annotated[SerializeAsAny[Sep2Model] | None, Element("Resource", polymorphic=True)] = (
        None
    )
    status: Annotated[UInt8, Element("status")]
    subscription_uri: Annotated[str, Element("subscriptionURI")]


class Error(Sep2Model):
    """An error body. Envoy sends reasonCode 0 for every 4xx and 16384 (outside the 2030.5
    enumeration) for 500, plus a free-text ``message`` that the XSD does not define."""

    xml_tag: ClassVar[str] = "Error"

    max_retry_duration: Annotated[UInt16 | None, Element("maxRetryDuration")] = None
    reason_code: Annotated[UInt16, Element("reasonCode")]
    message: Annotated[str | None, Element("message")] = None


# --------------------------------------------------------------------------- other roots seen


class LogEvent(Resource):
    """A device log entry (functionSet 11 = DER, profileID 2 = IEEE 2030.5)."""

    xml_tag: ClassVar[str] = "LogEvent"

    created_date_time: Annotated[TimeType, Element("createdDateTime")]
    details: Annotated[str | None, Element("details")] = None
    extended_data: Annotated[UInt32 | None, Element("extendedData")] = None
    function_set: Annotated[UInt8, Element("functionSet")]
    log_event_code: Annotated[UInt8, Element("logEventCode")]
    log_event_id: Annotated[UInt16, Element("logEventID")]
    log_event_pen: Annotated[UInt32, Element("logEventPEN")]
    profile_id: Annotated[UInt8, Element("profileID")]


class LogEventList(Sep2List):
    xml_tag: ClassVar[str] = "LogEventList"

    items: Annotated[tuple[LogEvent, ...], Element("LogEvent")] = ()


class RateComponent(Resource):
    """One component of a tariff (IEEE 2030.5 §10.5): e.g. the import or the export energy
    price, in the unit of its ReadingType (per kWh), with its TimeTariffIntervals."""

    xml_tag: ClassVar[str] = "RateComponent"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    active_time_tariff_interval_list_link: Annotated[
        ListLink | None, Element("ActiveTimeTariffIntervalListLink")
    ] = None
    reading_type_link: Annotated[Link | None, Element("ReadingTypeLink")] = None
    role_flags: Annotated[HexBinary16 | None, Element("roleFlags")] = None
    time_tariff_interval_list_link: Annotated[
        ListLink | None, Element("TimeTariffIntervalListLink")
    ] = None


class RateComponentList(Sep2List):
    """Envoy v1.5 sends this without ``href`` (and with a ``subscribable`` the XSD forbids)."""

    xml_tag: ClassVar[str] = "RateComponentList"

    items: Annotated[tuple[RateComponent, ...], Element("RateComponent")] = ()


class TariffProfile(Resource):
    """A schedule of charges (IEEE 2030.5 §10.5); ``currency`` is the ISO 4217 number."""

    xml_tag: ClassVar[str] = "TariffProfile"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    currency: Annotated[UInt16 | None, Element("currency")] = None
    price_power_of_ten_multiplier: Annotated[
        PowerOfTenMultiplier | None, Element("pricePowerOfTenMultiplier")
    ] = None
    primacy: Annotated[UInt8, Element("primacy")]
    rate_code: Annotated[str | None, Element("rateCode")] = None
    rate_component_list_link: Annotated[ListLink | None, Element("RateComponentListLink")] = None
    service_category_kind: Annotated[UInt8, Element("serviceCategoryKind")]
    combined_time_tariff_interval_list_link: Annotated[
        ListLink | None, Element("CombinedTimeTariffIntervalListLink", CSIPAUS_V13)
    ] = None


class TariffProfileList(Sep2List):
    xml_tag: ClassVar[str] = "TariffProfileList"

    items: Annotated[tuple[TariffProfile, ...], Element("TariffProfile")] = ()


class ConsumptionTariffInterval(Resource):
    """One consumption block of a TimeTariffInterval: ``price`` in the TariffProfile's
    currency x 10^pricePowerOfTenMultiplier per unit of the RateComponent's ReadingType."""

    xml_tag: ClassVar[str] = "ConsumptionTariffInterval"

    consumption_block: Annotated[UInt8, Element("consumptionBlock")]
    price: Annotated[Int32 | None, Element("price")] = None
    start_value: Annotated[UInt48, Element("startValue")]


class ConsumptionTariffIntervalList(Sep2List):
    xml_tag: ClassVar[str] = "ConsumptionTariffIntervalList"

    items: Annotated[
        tuple[ConsumptionTariffInterval, ...], Element("ConsumptionTariffInterval")
    ] = ()


class ConsumptionTariffIntervalListSummary(Sep2Model):
    """CSIP-AUS v1.3: the interval's ConsumptionTariffIntervals inline (one GET fewer)."""

    all: Annotated[UInt32, Attribute("all")]
    results: Annotated[UInt32, Attribute("results")]
    items: Annotated[
        tuple[ConsumptionTariffInterval, ...], Element("ConsumptionTariffInterval")
    ] = ()


class TimeTariffInterval(Resource):
    """A time interval of a RateComponent with its price(s) (an Event: EventStatus, interval)."""

    xml_tag: ClassVar[str] = "TimeTariffInterval"

    reply_to: Annotated[str | None, Attribute("replyTo")] = None
    response_required: Annotated[HexBinary8 | None, Attribute("responseRequired")] = None
    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    creation_time: Annotated[TimeType, Element("creationTime")]
    event_status: Annotated[EventStatus | None, Element("EventStatus")] = None
    interval: Annotated[DateTimeInterval, Element("interval")]
    randomize_duration: Annotated[Int16 | None, Element("randomizeDuration")] = None
    randomize_start: Annotated[Int16 | None, Element("randomizeStart")] = None
    consumption_tariff_interval_list_link: Annotated[
        ListLink | None, Element("ConsumptionTariffIntervalListLink")
    ] = None
    tou_tier: Annotated[UInt8, Element("touTier")]
    consumption_tariff_interval_list_summary: Annotated[
        ConsumptionTariffIntervalListSummary | None,
        Element("ConsumptionTariffIntervalListSummary", CSIPAUS_V13),
    ] = None
    rate_component_link: Annotated[Link | None, Element("RateComponentLink")] = None
    """Not in the IEEE XSD: envoy (CSIP-AUS v1.3) requires it, in the 2030.5 namespace. Set it
    only when serving CSIP-AUS v1.3."""


class TimeTariffIntervalList(Sep2List):
    """Also the ActiveTimeTariffIntervalList and CSIP-AUS v1.3's combined list."""

    xml_tag: ClassVar[str] = "TimeTariffIntervalList"

    items: Annotated[tuple[TimeTariffInterval, ...], Element("TimeTariffInterval")] = ()


# --------------------------------------------------------------------------- DRLC (§10.4)


class ApplianceLoadReduction(Sep2Model):
    """0 delay appliance load, 1 temporary appliance load reduction."""

    type: Annotated[UInt8, Element("type")]


class DutyCycle(Sep2Model):
    """The largest share of time the device may be on, in percent."""

    normal_value: Annotated[UInt8, Element("normalValue")]


class Offset(Sep2Model):
    """Temperature offsets in 0.1 °C (cooling up, heating down) or a load adjustment in
    hundredths of a percent."""

    cooling_offset: Annotated[UInt8 | None, Element("coolingOffset")] = None
    heating_offset: Annotated[UInt8 | None, Element("heatingOffset")] = None
    load_adjustment_percentage_offset: Annotated[
        PerCent | None, Element("loadAdjustmentPercentageOffset")
    ] = None


class SetPoint(Sep2Model):
    """Temperatures in hundredths of a °C."""

    cooling_setpoint: Annotated[Int16 | None, Element("coolingSetpoint")] = None
    heating_setpoint: Annotated[Int16 | None, Element("heatingSetpoint")] = None


class EndDeviceControl(Resource):
    """A demand response event for end devices (thermostats, water heaters, ...)."""

    xml_tag: ClassVar[str] = "EndDeviceControl"

    reply_to: Annotated[str | None, Attribute("replyTo")] = None
    response_required: Annotated[HexBinary8 | None, Attribute("responseRequired")] = None
    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    creation_time: Annotated[TimeType, Element("creationTime")]
    event_status: Annotated[EventStatus | None, Element("EventStatus")] = None
    interval: Annotated[DateTimeInterval, Element("interval")]
    randomize_duration: Annotated[Int16 | None, Element("randomizeDuration")] = None
    randomize_start: Annotated[Int16 | None, Element("randomizeStart")] = None
    appliance_load_reduction: Annotated[
        ApplianceLoadReduction | None, Element("ApplianceLoadReduction")
    ] = None
    device_category: Annotated[HexBinary32, Element("deviceCategory")]
    dr_program_mandatory: Annotated[bool, Element("drProgramMandatory")]
    duty_cycle: Annotated[DutyCycle | None, Element("DutyCycle")] = None
    load_shift_forward: Annotated[bool, Element("loadShiftForward")]
    offset: Annotated[Offset | None, Element("Offset")] = None
    override_duration: Annotated[UInt16 | None, Element("overrideDuration")] = None
    set_point: Annotated[SetPoint | None, Element("SetPoint")] = None


class EndDeviceControlList(Sep2List):
    """Also the ActiveEndDeviceControlList."""

    xml_tag: ClassVar[str] = "EndDeviceControlList"

    items: Annotated[tuple[EndDeviceControl, ...], Element("EndDeviceControl")] = ()


class DemandResponseProgram(Resource):
    xml_tag: ClassVar[str] = "DemandResponseProgram"

    subscribable: Annotated[UInt8 | None, Attribute("subscribable")] = None
    mrid: Annotated[HexBinary128, Element("mRID")]
    description: Annotated[str | None, Element("description")] = None
    version: Annotated[UInt16 | None, Element("version")] = None
    active_end_device_control_list_link: Annotated[
        ListLink | None, Element("ActiveEndDeviceControlListLink")
    ] = None
    end_device_control_list_link: Annotated[
        ListLink | None, Element("EndDeviceControlListLink")
    ] = None
    primacy: Annotated[UInt8, Element("primacy")]


class DemandResponseProgramList(Sep2List):
    xml_tag: ClassVar[str] = "DemandResponseProgramList"

    items: Annotated[tuple[DemandResponseProgram, ...], Element("DemandResponseProgram")] = ()


_ROOTS: Final[tuple[type[Sep2Model], ...]] = (
    ConnectionPoint,
    DER,
    DERAvailability,
    DERCapability,
    DERControl,
    DERControlList,
    DERControlResponse,
    DERList,
    DERProgram,
    DERProgramList,
    DERSettings,
    DERStatus,
    DefaultDERControl,
    DeviceCapability,
    EndDevice,
    EndDeviceList,
    Error,
    FunctionSetAssignments,
    FunctionSetAssignmentsList,
    LogEvent,
    LogEventList,
    MirrorMeterReading,
    MirrorMeterReadingList,
    MirrorUsagePoint,
    MirrorUsagePointList,
    Notification,
    RateComponent,
    RateComponentList,
    ReadingType,
    Registration,
    Response,
    ResponseList,
    ResponseSet,
    ResponseSetList,
    Subscription,
    SubscriptionList,
    TariffProfile,
    TariffProfileList,
    Time,
    TimeTariffInterval,
    TimeTariffIntervalList,
    ConsumptionTariffInterval,
    ConsumptionTariffIntervalList,
    DemandResponseProgram,
    DemandResponseProgramList,
    EndDeviceControl,
    EndDeviceControlList,
)

ROOT_MODELS: Final[Mapping[str, type[Sep2Model]]] = MappingProxyType(
    {cls.xml_tag: cls for cls in _ROOTS}
)
"""Every model that may be a document root (or a notification resource), by element name."""
