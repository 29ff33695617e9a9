from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddressSpace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IOPORT: _ClassVar[AddressSpace]
    MMIO: _ClassVar[AddressSpace]
IOPORT: AddressSpace
MMIO: AddressSpace

class CpuidEntry(_message.Message):
    __slots__ = ("function", "has_index", "index", "eax", "ebx", "ecx", "edx")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    HAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EAX_FIELD_NUMBER: _ClassVar[int]
    EBX_FIELD_NUMBER: _ClassVar[int]
    ECX_FIELD_NUMBER: _ClassVar[int]
    EDX_FIELD_NUMBER: _ClassVar[int]
    function: int
    has_index: bool
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int
    def __init__(self, function: _Optional[int] = ..., has_index: _Optional[bool] = ..., index: _Optional[int] = ..., eax: _Optional[int] = ..., ebx: _Optional[int] = ..., ecx: _Optional[int] = ..., edx: _Optional[int] = ...) -> None: ...

class MainRequest(_message.Message):
    __slots__ = ("create", "destroy", "new_connection", "get_shutdown_eventfd", "check_extension", "get_supported_cpuid", "get_emulated_cpuid", "get_msr_index_list", "get_net_config", "reserve_range", "set_irq", "set_irq_routing", "get_state", "set_state", "set_identity_map_addr", "pause_vcpus", "get_vcpus", "start", "set_call_hint", "dirty_log")
    class StateSet(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PIC0: _ClassVar[MainRequest.StateSet]
        PIC1: _ClassVar[MainRequest.StateSet]
        IOAPIC: _ClassVar[MainRequest.StateSet]
        PIT: _ClassVar[MainRequest.StateSet]
        CLOCK: _ClassVar[MainRequest.StateSet]
    PIC0: MainRequest.StateSet
    PIC1: MainRequest.StateSet
    IOAPIC: MainRequest.StateSet
    PIT: MainRequest.StateSet
    CLOCK: MainRequest.StateSet
    class Create(_message.Message):
        __slots__ = ("id", "io_event", "memory", "irq_event")
        class IoEvent(_message.Message):
            __slots__ = ("space", "address", "length", "datamatch")
            SPACE_FIELD_NUMBER: _ClassVar[int]
            ADDRESS_FIELD_NUMBER: _ClassVar[int]
            LENGTH_FIELD_NUMBER: _ClassVar[int]
            DATAMATCH_FIELD_NUMBER: _ClassVar[int]
            space: AddressSpace
            address: int
            length: int
            datamatch: int
            def __init__(self, space: _Optional[_Union[AddressSpace, str]] = ..., address: _Optional[int] = ..., length: _Optional[int] = ..., datamatch: _Optional[int] = ...) -> None: ...
        class Memory(_message.Message):
            __slots__ = ("offset", "start", "length", "read_only", "dirty_log")
            OFFSET_FIELD_NUMBER: _ClassVar[int]
            START_FIELD_NUMBER: _ClassVar[int]
            LENGTH_FIELD_NUMBER: _ClassVar[int]
            READ_ONLY_FIELD_NUMBER: _ClassVar[int]
            DIRTY_LOG_FIELD_NUMBER: _ClassVar[int]
            offset: int
            start: int
            length: int
            read_only: bool
            dirty_log: bool
            def __init__(self, offset: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., read_only: _Optional[bool] = ..., dirty_log: _Optional[bool] = ...) -> None: ...
        class IrqEvent(_message.Message):
            __slots__ = ("irq_id", "resample")
            IRQ_ID_FIELD_NUMBER: _ClassVar[int]
            RESAMPLE_FIELD_NUMBER: _ClassVar[int]
            irq_id: int
            resample: bool
            def __init__(self, irq_id: _Optional[int] = ..., resample: _Optional[bool] = ...) -> None: ...
        ID_FIELD_NUMBER: _ClassVar[int]
        IO_EVENT_FIELD_NUMBER: _ClassVar[int]
        MEMORY_FIELD_NUMBER: _ClassVar[int]
        IRQ_EVENT_FIELD_NUMBER: _ClassVar[int]
        id: int
        io_event: MainRequest.Create.IoEvent
        memory: MainRequest.Create.Memory
        irq_event: MainRequest.Create.IrqEvent
        def __init__(self, id: _Optional[int] = ..., io_event: _Optional[_Union[MainRequest.Create.IoEvent, _Mapping]] = ..., memory: _Optional[_Union[MainRequest.Create.Memory, _Mapping]] = ..., irq_event: _Optional[_Union[MainRequest.Create.IrqEvent, _Mapping]] = ...) -> None: ...
    class Destroy(_message.Message):
        __slots__ = ("id",)
        ID_FIELD_NUMBER: _ClassVar[int]
        id: int
        def __init__(self, id: _Optional[int] = ...) -> None: ...
    class NewConnection(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class GetShutdownEventfd(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class CheckExtension(_message.Message):
        __slots__ = ("extension",)
        EXTENSION_FIELD_NUMBER: _ClassVar[int]
        extension: int
        def __init__(self, extension: _Optional[int] = ...) -> None: ...
    class CpuidRequest(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class MsrListRequest(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class GetNetConfig(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class ReserveRange(_message.Message):
        __slots__ = ("space", "start", "length", "async_write")
        SPACE_FIELD_NUMBER: _ClassVar[int]
        START_FIELD_NUMBER: _ClassVar[int]
        LENGTH_FIELD_NUMBER: _ClassVar[int]
        ASYNC_WRITE_FIELD_NUMBER: _ClassVar[int]
        space: AddressSpace
        start: int
        length: int
        async_write: bool
        def __init__(self, space: _Optional[_Union[AddressSpace, str]] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., async_write: _Optional[bool] = ...) -> None: ...
    class SetIrq(_message.Message):
        __slots__ = ("irq_id", "active")
        IRQ_ID_FIELD_NUMBER: _ClassVar[int]
        ACTIVE_FIELD_NUMBER: _ClassVar[int]
        irq_id: int
        active: bool
        def __init__(self, irq_id: _Optional[int] = ..., active: _Optional[bool] = ...) -> None: ...
    class SetIrqRouting(_message.Message):
        __slots__ = ("routes",)
        class Route(_message.Message):
            __slots__ = ("irq_id", "irqchip", "msi")
            class Irqchip(_message.Message):
                __slots__ = ("irqchip", "pin")
                IRQCHIP_FIELD_NUMBER: _ClassVar[int]
                PIN_FIELD_NUMBER: _ClassVar[int]
                irqchip: int
                pin: int
                def __init__(self, irqchip: _Optional[int] = ..., pin: _Optional[int] = ...) -> None: ...
            class Msi(_message.Message):
                __slots__ = ("address", "data")
                ADDRESS_FIELD_NUMBER: _ClassVar[int]
                DATA_FIELD_NUMBER: _ClassVar[int]
                address: int
                data: int
                def __init__(self, address: _Optional[int] = ..., data: _Optional[int] = ...) -> None: ...
            IRQ_ID_FIELD_NUMBER: _ClassVar[int]
            IRQCHIP_FIELD_NUMBER: _ClassVar[int]
            MSI_FIELD_NUMBER: _ClassVar[int]
            irq_id: int
            irqchip: MainRequest.SetIrqRouting.Route.Irqchip
            msi: MainRequest.SetIrqRouting.Route.Msi
            def __init__(self, irq_id: _Optional[int] = ..., irqchip: _Optional[_Union[MainRequest.SetIrqRouting.Route.Irqchip, _Mapping]] = ..., msi: _Optional[_Union[MainRequest.SetIrqRouting.Route.Msi, _Mapping]] = ...) -> None: ...
        ROUTES_FIELD_NUMBER: _ClassVar[int]
        routes: _containers.RepeatedCompositeFieldContainer[MainRequest.SetIrqRouting.Route]
        def __init__(self, routes: _Optional[_Iterable[_Union[MainRequest.SetIrqRouting.Route, _Mapping]]] = ...) -> None: ...
    class GetState(_message.Message):
        __slots__ = ("set",)
        SET_FIELD_NUMBER: _ClassVar[int]
        set: MainRequest.StateSet
        def __init__(self, set: _Optional[_Union[MainRequest.StateSet, str]] = ...) -> None: ...
    class SetState(_message.Message):
        __slots__ = ("set", "state")
        SET_FIELD_NUMBER: _ClassVar[int]
        STATE_FIELD_NUMBER: _ClassVar[int]
        set: MainRequest.StateSet
        state: bytes
        def __init__(self, set: _Optional[_Union[MainRequest.StateSet, str]] = ..., state: _Optional[bytes] = ...) -> None: ...
    class SetIdentityMapAddr(_message.Message):
        __slots__ = ("address",)
        ADDRESS_FIELD_NUMBER: _ClassVar[int]
        address: int
        def __init__(self, address: _Optional[int] = ...) -> None: ...
    class PauseVcpus(_message.Message):
        __slots__ = ("cpu_mask", "user")
        CPU_MASK_FIELD_NUMBER: _ClassVar[int]
        USER_FIELD_NUMBER: _ClassVar[int]
        cpu_mask: int
        user: int
        def __init__(self, cpu_mask: _Optional[int] = ..., user: _Optional[int] = ...) -> None: ...
    class GetVcpus(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Start(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class SetCallHint(_message.Message):
        __slots__ = ("space", "address", "on_write", "hints")
        class RegHint(_message.Message):
            __slots__ = ("match_rax", "match_rbx", "match_rcx", "match_rdx", "rax", "rbx", "rcx", "rdx", "send_sregs", "send_debugregs")
            MATCH_RAX_FIELD_NUMBER: _ClassVar[int]
            MATCH_RBX_FIELD_NUMBER: _ClassVar[int]
            MATCH_RCX_FIELD_NUMBER: _ClassVar[int]
            MATCH_RDX_FIELD_NUMBER: _ClassVar[int]
            RAX_FIELD_NUMBER: _ClassVar[int]
            RBX_FIELD_NUMBER: _ClassVar[int]
            RCX_FIELD_NUMBER: _ClassVar[int]
            RDX_FIELD_NUMBER: _ClassVar[int]
            SEND_SREGS_FIELD_NUMBER: _ClassVar[int]
            SEND_DEBUGREGS_FIELD_NUMBER: _ClassVar[int]
            match_rax: bool
            match_rbx: bool
            match_rcx: bool
            match_rdx: bool
            rax: int
            rbx: int
            rcx: int
            rdx: int
            send_sregs: bool
            send_debugregs: bool
            def __init__(self, match_rax: _Optional[bool] = ..., match_rbx: _Optional[bool] = ..., match_rcx: _Optional[bool] = ..., match_rdx: _Optional[bool] = ..., rax: _Optional[int] = ..., rbx: _Optional[int] = ..., rcx: _Optional[int] = ..., rdx: _Optional[int] = ..., send_sregs: _Optional[bool] = ..., send_debugregs: _Optional[bool] = ...) -> None: ...
        SPACE_FIELD_NUMBER: _ClassVar[int]
        ADDRESS_FIELD_NUMBER: _ClassVar[int]
        ON_WRITE_FIELD_NUMBER: _ClassVar[int]
        HINTS_FIELD_NUMBER: _ClassVar[int]
        space: AddressSpace
        address: int
        on_write: bool
        hints: _containers.RepeatedCompositeFieldContainer[MainRequest.SetCallHint.RegHint]
        def __init__(self, space: _Optional[_Union[AddressSpace, str]] = ..., address: _Optional[int] = ..., on_write: _Optional[bool] = ..., hints: _Optional[_Iterable[_Union[MainRequest.SetCallHint.RegHint, _Mapping]]] = ...) -> None: ...
    class MemoryDirtyLog(_message.Message):
        __slots__ = ("id",)
        ID_FIELD_NUMBER: _ClassVar[int]
        id: int
        def __init__(self, id: _Optional[int] = ...) -> None: ...
    CREATE_FIELD_NUMBER: _ClassVar[int]
    DESTROY_FIELD_NUMBER: _ClassVar[int]
    NEW_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    GET_SHUTDOWN_EVENTFD_FIELD_NUMBER: _ClassVar[int]
    CHECK_EXTENSION_FIELD_NUMBER: _ClassVar[int]
    GET_SUPPORTED_CPUID_FIELD_NUMBER: _ClassVar[int]
    GET_EMULATED_CPUID_FIELD_NUMBER: _ClassVar[int]
    GET_MSR_INDEX_LIST_FIELD_NUMBER: _ClassVar[int]
    GET_NET_CONFIG_FIELD_NUMBER: _ClassVar[int]
    RESERVE_RANGE_FIELD_NUMBER: _ClassVar[int]
    SET_IRQ_FIELD_NUMBER: _ClassVar[int]
    SET_IRQ_ROUTING_FIELD_NUMBER: _ClassVar[int]
    GET_STATE_FIELD_NUMBER: _ClassVar[int]
    SET_STATE_FIELD_NUMBER: _ClassVar[int]
    SET_IDENTITY_MAP_ADDR_FIELD_NUMBER: _ClassVar[int]
    PAUSE_VCPUS_FIELD_NUMBER: _ClassVar[int]
    GET_VCPUS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SET_CALL_HINT_FIELD_NUMBER: _ClassVar[int]
    DIRTY_LOG_FIELD_NUMBER: _ClassVar[int]
    create: MainRequest.Create
    destroy: MainRequest.Destroy
    new_connection: MainRequest.NewConnection
    get_shutdown_eventfd: MainRequest.GetShutdownEventfd
    check_extension: MainRequest.CheckExtension
    get_supported_cpuid: MainRequest.CpuidRequest
    get_emulated_cpuid: MainRequest.CpuidRequest
    get_msr_index_list: MainRequest.MsrListRequest
    get_net_config: MainRequest.GetNetConfig
    reserve_range: MainRequest.ReserveRange
    set_irq: MainRequest.SetIrq
    set_irq_routing: MainRequest.SetIrqRouting
    get_state: MainRequest.GetState
    set_state: MainRequest.SetState
    set_identity_map_addr: MainRequest.SetIdentityMapAddr
    pause_vcpus: MainRequest.PauseVcpus
    get_vcpus: MainRequest.GetVcpus
    start: MainRequest.Start
    set_call_hint: MainRequest.SetCallHint
    dirty_log: MainRequest.MemoryDirtyLog
    def __init__(self, create: _Optional[_Union[MainRequest.Create, _Mapping]] = ..., destroy: _Optional[_Union[MainRequest.Destroy, _Mapping]] = ..., new_connection: _Optional[_Union[MainRequest.NewConnection, _Mapping]] = ..., get_shutdown_eventfd: _Optional[_Union[MainRequest.GetShutdownEventfd, _Mapping]] = ..., check_extension: _Optional[_Union[MainRequest.CheckExtension, _Mapping]] = ..., get_supported_cpuid: _Optional[_Union[MainRequest.CpuidRequest, _Mapping]] = ..., get_emulated_cpuid: _Optional[_Union[MainRequest.CpuidRequest, _Mapping]] = ..., get_msr_index_list: _Optional[_Union[MainRequest.MsrListRequest, _Mapping]] = ..., get_net_config: _Optional[_Union[MainRequest.GetNetConfig, _Mapping]] = ..., reserve_range: _Optional[_Union[MainRequest.ReserveRange, _Mapping]] = ..., set_irq: _Optional[_Union[MainRequest.SetIrq, _Mapping]] = ..., set_irq_routing: _Optional[_Union[MainRequest.SetIrqRouting, _Mapping]] = ..., get_state: _Optional[_Union[MainRequest.GetState, _Mapping]] = ..., set_state: _Optional[_Union[MainRequest.SetState, _Mapping]] = ..., set_identity_map_addr: _Optional[_Union[MainRequest.SetIdentityMapAddr, _Mapping]] = ..., pause_vcpus: _Optional[_Union[MainRequest.PauseVcpus, _Mapping]] = ..., get_vcpus: _Optional[_Union[MainRequest.GetVcpus, _Mapping]] = ..., start: _Optional[_Union[MainRequest.Start, _Mapping]] = ..., set_call_hint: _Optional[_Union[MainRequest.SetCallHint, _Mapping]] = ..., dirty_log: _Optional[_Union[MainRequest.MemoryDirtyLog, _Mapping]] = ...) -> None: ...

class MainResponse(_message.Message):
    __slots__ = ("errno", "create", "destroy", "new_connection", "get_shutdown_eventfd", "check_extension", "get_supported_cpuid", "get_emulated_cpuid", "get_msr_index_list", "get_net_config", "reserve_range", "set_irq", "set_irq_routing", "get_state", "set_state", "set_identity_map_addr", "pause_vcpus", "get_vcpus", "start", "set_call_hint", "dirty_log")
    class Create(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Destroy(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class NewConnection(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class GetShutdownEventfd(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class CheckExtension(_message.Message):
        __slots__ = ("has_extension",)
        HAS_EXTENSION_FIELD_NUMBER: _ClassVar[int]
        has_extension: bool
        def __init__(self, has_extension: _Optional[bool] = ...) -> None: ...
    class CpuidResponse(_message.Message):
        __slots__ = ("entries",)
        ENTRIES_FIELD_NUMBER: _ClassVar[int]
        entries: _containers.RepeatedCompositeFieldContainer[CpuidEntry]
        def __init__(self, entries: _Optional[_Iterable[_Union[CpuidEntry, _Mapping]]] = ...) -> None: ...
    class MsrListResponse(_message.Message):
        __slots__ = ("indices",)
        INDICES_FIELD_NUMBER: _ClassVar[int]
        indices: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, indices: _Optional[_Iterable[int]] = ...) -> None: ...
    class GetNetConfig(_message.Message):
        __slots__ = ("host_mac_address", "host_ipv4_address", "netmask")
        HOST_MAC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
        HOST_IPV4_ADDRESS_FIELD_NUMBER: _ClassVar[int]
        NETMASK_FIELD_NUMBER: _ClassVar[int]
        host_mac_address: bytes
        host_ipv4_address: int
        netmask: int
        def __init__(self, host_mac_address: _Optional[bytes] = ..., host_ipv4_address: _Optional[int] = ..., netmask: _Optional[int] = ...) -> None: ...
    class ReserveRange(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class SetIrq(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class SetIrqRouting(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class GetState(_message.Message):
        __slots__ = ("state",)
        STATE_FIELD_NUMBER: _ClassVar[int]
        state: bytes
        def __init__(self, state: _Optional[bytes] = ...) -> None: ...
    class SetState(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class SetIdentityMapAddr(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class PauseVcpus(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class GetVcpus(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Start(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class SetCallHint(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class MemoryDirtyLog(_message.Message):
        __slots__ = ("bitmap",)
        BITMAP_FIELD_NUMBER: _ClassVar[int]
        bitmap: bytes
        def __init__(self, bitmap: _Optional[bytes] = ...) -> None: ...
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    CREATE_FIELD_NUMBER: _ClassVar[int]
    DESTROY_FIELD_NUMBER: _ClassVar[int]
    NEW_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    GET_SHUTDOWN_EVENTFD_FIELD_NUMBER: _ClassVar[int]
    CHECK_EXTENSION_FIELD_NUMBER: _ClassVar[int]
    GET_SUPPORTED_CPUID_FIELD_NUMBER: _ClassVar[int]
    GET_EMULATED_CPUID_FIELD_NUMBER: _ClassVar[int]
    GET_MSR_INDEX_LIST_FIELD_NUMBER: _ClassVar[int]
    GET_NET_CONFIG_FIELD_NUMBER: _ClassVar[int]
    RESERVE_RANGE_FIELD_NUMBER: _ClassVar[int]
    SET_IRQ_FIELD_NUMBER: _ClassVar[int]
    SET_IRQ_ROUTING_FIELD_NUMBER: _ClassVar[int]
    GET_STATE_FIELD_NUMBER: _ClassVar[int]
    SET_STATE_FIELD_NUMBER: _ClassVar[int]
    SET_IDENTITY_MAP_ADDR_FIELD_NUMBER: _ClassVar[int]
    PAUSE_VCPUS_FIELD_NUMBER: _ClassVar[int]
    GET_VCPUS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SET_CALL_HINT_FIELD_NUMBER: _ClassVar[int]
    DIRTY_LOG_FIELD_NUMBER: _ClassVar[int]
    errno: int
    create: MainResponse.Create
    destroy: MainResponse.Destroy
    new_connection: MainResponse.NewConnection
    get_shutdown_eventfd: MainResponse.GetShutdownEventfd
    check_extension: MainResponse.CheckExtension
    get_supported_cpuid: MainResponse.CpuidResponse
    get_emulated_cpuid: MainResponse.CpuidResponse
    get_msr_index_list: MainResponse.MsrListResponse
    get_net_config: MainResponse.GetNetConfig
    reserve_range: MainResponse.ReserveRange
    set_irq: MainResponse.SetIrq
    set_irq_routing: MainResponse.SetIrqRouting
    get_state: MainResponse.GetState
    set_state: MainResponse.SetState
    set_identity_map_addr: MainResponse.SetIdentityMapAddr
    pause_vcpus: MainResponse.PauseVcpus
    get_vcpus: MainResponse.GetVcpus
    start: MainResponse.Start
    set_call_hint: MainResponse.SetCallHint
    dirty_log: MainResponse.MemoryDirtyLog
    def __init__(self, errno: _Optional[int] = ..., create: _Optional[_Union[MainResponse.Create, _Mapping]] = ..., destroy: _Optional[_Union[MainResponse.Destroy, _Mapping]] = ..., new_connection: _Optional[_Union[MainResponse.NewConnection, _Mapping]] = ..., get_shutdown_eventfd: _Optional[_Union[MainResponse.GetShutdownEventfd, _Mapping]] = ..., check_extension: _Optional[_Union[MainResponse.CheckExtension, _Mapping]] = ..., get_supported_cpuid: _Optional[_Union[MainResponse.CpuidResponse, _Mapping]] = ..., get_emulated_cpuid: _Optional[_Union[MainResponse.CpuidResponse, _Mapping]] = ..., get_msr_index_list: _Optional[_Union[MainResponse.MsrListResponse, _Mapping]] = ..., get_net_config: _Optional[_Union[MainResponse.GetNetConfig, _Mapping]] = ..., reserve_range: _Optional[_Union[MainResponse.ReserveRange, _Mapping]] = ..., set_irq: _Optional[_Union[MainResponse.SetIrq, _Mapping]] = ..., set_irq_routing: _Optional[_Union[MainResponse.SetIrqRouting, _Mapping]] = ..., get_state: _Optional[_Union[MainResponse.GetState, _Mapping]] = ..., set_state: _Optional[_Union[MainResponse.SetState, _Mapping]] = ..., set_identity_map_addr: _Optional[_Union[MainResponse.SetIdentityMapAddr, _Mapping]] = ..., pause_vcpus: _Optional[_Union[MainResponse.PauseVcpus, _Mapping]] = ..., get_vcpus: _Optional[_Union[MainResponse.GetVcpus, _Mapping]] = ..., start: _Optional[_Union[MainResponse.Start, _Mapping]] = ..., set_call_hint: _Optional[_Union[MainResponse.SetCallHint, _Mapping]] = ..., dirty_log: _Optional[_Union[MainResponse.MemoryDirtyLog, _Mapping]] = ...) -> None: ...

class VcpuRequest(_message.Message):
    __slots__ = ("wait", "resume", "get_state", "set_state", "get_msrs", "set_msrs", "set_cpuid", "shutdown", "get_hyperv_cpuid", "enable_capability")
    class StateSet(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REGS: _ClassVar[VcpuRequest.StateSet]
        SREGS: _ClassVar[VcpuRequest.StateSet]
        FPU: _ClassVar[VcpuRequest.StateSet]
        DEBUGREGS: _ClassVar[VcpuRequest.StateSet]
        LAPIC: _ClassVar[VcpuRequest.StateSet]
        MP: _ClassVar[VcpuRequest.StateSet]
        XCREGS: _ClassVar[VcpuRequest.StateSet]
        EVENTS: _ClassVar[VcpuRequest.StateSet]
    REGS: VcpuRequest.StateSet
    SREGS: VcpuRequest.StateSet
    FPU: VcpuRequest.StateSet
    DEBUGREGS: VcpuRequest.StateSet
    LAPIC: VcpuRequest.StateSet
    MP: VcpuRequest.StateSet
    XCREGS: VcpuRequest.StateSet
    EVENTS: VcpuRequest.StateSet
    class Wait(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Resume(_message.Message):
        __slots__ = ("data", "regs", "sregs", "debugregs")
        DATA_FIELD_NUMBER: _ClassVar[int]
        REGS_FIELD_NUMBER: _ClassVar[int]
        SREGS_FIELD_NUMBER: _ClassVar[int]
        DEBUGREGS_FIELD_NUMBER: _ClassVar[int]
        data: bytes
        regs: bytes
        sregs: bytes
        debugregs: bytes
        def __init__(self, data: _Optional[bytes] = ..., regs: _Optional[bytes] = ..., sregs: _Optional[bytes] = ..., debugregs: _Optional[bytes] = ...) -> None: ...
    class GetState(_message.Message):
        __slots__ = ("set",)
        SET_FIELD_NUMBER: _ClassVar[int]
        set: VcpuRequest.StateSet
        def __init__(self, set: _Optional[_Union[VcpuRequest.StateSet, str]] = ...) -> None: ...
    class SetState(_message.Message):
        __slots__ = ("set", "state")
        SET_FIELD_NUMBER: _ClassVar[int]
        STATE_FIELD_NUMBER: _ClassVar[int]
        set: VcpuRequest.StateSet
        state: bytes
        def __init__(self, set: _Optional[_Union[VcpuRequest.StateSet, str]] = ..., state: _Optional[bytes] = ...) -> None: ...
    class CpuidRequest(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class GetMsrs(_message.Message):
        __slots__ = ("entry_indices",)
        ENTRY_INDICES_FIELD_NUMBER: _ClassVar[int]
        entry_indices: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, entry_indices: _Optional[_Iterable[int]] = ...) -> None: ...
    class MsrEntry(_message.Message):
        __slots__ = ("index", "data")
        INDEX_FIELD_NUMBER: _ClassVar[int]
        DATA_FIELD_NUMBER: _ClassVar[int]
        index: int
        data: int
        def __init__(self, index: _Optional[int] = ..., data: _Optional[int] = ...) -> None: ...
    class SetMsrs(_message.Message):
        __slots__ = ("entries",)
        ENTRIES_FIELD_NUMBER: _ClassVar[int]
        entries: _containers.RepeatedCompositeFieldContainer[VcpuRequest.MsrEntry]
        def __init__(self, entries: _Optional[_Iterable[_Union[VcpuRequest.MsrEntry, _Mapping]]] = ...) -> None: ...
    class SetCpuid(_message.Message):
        __slots__ = ("entries",)
        ENTRIES_FIELD_NUMBER: _ClassVar[int]
        entries: _containers.RepeatedCompositeFieldContainer[CpuidEntry]
        def __init__(self, entries: _Optional[_Iterable[_Union[CpuidEntry, _Mapping]]] = ...) -> None: ...
    class Shutdown(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class EnableCapability(_message.Message):
        __slots__ = ("capability",)
        CAPABILITY_FIELD_NUMBER: _ClassVar[int]
        capability: int
        def __init__(self, capability: _Optional[int] = ...) -> None: ...
    WAIT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    GET_STATE_FIELD_NUMBER: _ClassVar[int]
    SET_STATE_FIELD_NUMBER: _ClassVar[int]
    GET_MSRS_FIELD_NUMBER: _ClassVar[int]
    SET_MSRS_FIELD_NUMBER: _ClassVar[int]
    SET_CPUID_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    GET_HYPERV_CPUID_FIELD_NUMBER: _ClassVar[int]
    ENABLE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    wait: VcpuRequest.Wait
    resume: VcpuRequest.Resume
    get_state: VcpuRequest.GetState
    set_state: VcpuRequest.SetState
    get_msrs: VcpuRequest.GetMsrs
    set_msrs: VcpuRequest.SetMsrs
    set_cpuid: VcpuRequest.SetCpuid
    shutdown: VcpuRequest.Shutdown
    get_hyperv_cpuid: VcpuRequest.CpuidRequest
    enable_capability: VcpuRequest.EnableCapability
    def __init__(self, wait: _Optional[_Union[VcpuRequest.Wait, _Mapping]] = ..., resume: _Optional[_Union[VcpuRequest.Resume, _Mapping]] = ..., get_state: _Optional[_Union[VcpuRequest.GetState, _Mapping]] = ..., set_state: _Optional[_Union[VcpuRequest.SetState, _Mapping]] = ..., get_msrs: _Optional[_Union[VcpuRequest.GetMsrs, _Mapping]] = ..., set_msrs: _Optional[_Union[VcpuRequest.SetMsrs, _Mapping]] = ..., set_cpuid: _Optional[_Union[VcpuRequest.SetCpuid, _Mapping]] = ..., shutdown: _Optional[_Union[VcpuRequest.Shutdown, _Mapping]] = ..., get_hyperv_cpuid: _Optional[_Union[VcpuRequest.CpuidRequest, _Mapping]] = ..., enable_capability: _Optional[_Union[VcpuRequest.EnableCapability, _Mapping]] = ...) -> None: ...

class VcpuResponse(_message.Message):
    __slots__ = ("errno", "wait", "get_state", "set_state", "get_msrs", "set_msrs", "set_cpuid", "get_hyperv_cpuid", "enable_capability")
    class Wait(_message.Message):
        __slots__ = ("init", "io", "user", "hyperv_call", "hyperv_synic")
        class Init(_message.Message):
            __slots__ = ()
            def __init__(self) -> None: ...
        class Io(_message.Message):
            __slots__ = ("space", "address", "is_write", "no_resume", "data", "regs", "sregs", "debugregs")
            SPACE_FIELD_NUMBER: _ClassVar[int]
            ADDRESS_FIELD_NUMBER: _ClassVar[int]
            IS_WRITE_FIELD_NUMBER: _ClassVar[int]
            NO_RESUME_FIELD_NUMBER: _ClassVar[int]
            DATA_FIELD_NUMBER: _ClassVar[int]
            REGS_FIELD_NUMBER: _ClassVar[int]
            SREGS_FIELD_NUMBER: _ClassVar[int]
            DEBUGREGS_FIELD_NUMBER: _ClassVar[int]
            space: AddressSpace
            address: int
            is_write: bool
            no_resume: bool
            data: bytes
            regs: bytes
            sregs: bytes
            debugregs: bytes
            def __init__(self, space: _Optional[_Union[AddressSpace, str]] = ..., address: _Optional[int] = ..., is_write: _Optional[bool] = ..., no_resume: _Optional[bool] = ..., data: _Optional[bytes] = ..., regs: _Optional[bytes] = ..., sregs: _Optional[bytes] = ..., debugregs: _Optional[bytes] = ...) -> None: ...
        class User(_message.Message):
            __slots__ = ("user",)
            USER_FIELD_NUMBER: _ClassVar[int]
            user: int
            def __init__(self, user: _Optional[int] = ...) -> None: ...
        class HypervCall(_message.Message):
            __slots__ = ("input", "params0", "params1")
            INPUT_FIELD_NUMBER: _ClassVar[int]
            PARAMS0_FIELD_NUMBER: _ClassVar[int]
            PARAMS1_FIELD_NUMBER: _ClassVar[int]
            input: int
            params0: int
            params1: int
            def __init__(self, input: _Optional[int] = ..., params0: _Optional[int] = ..., params1: _Optional[int] = ...) -> None: ...
        class HypervSynic(_message.Message):
            __slots__ = ("msr", "control", "evt_page", "msg_page")
            MSR_FIELD_NUMBER: _ClassVar[int]
            CONTROL_FIELD_NUMBER: _ClassVar[int]
            EVT_PAGE_FIELD_NUMBER: _ClassVar[int]
            MSG_PAGE_FIELD_NUMBER: _ClassVar[int]
            msr: int
            control: int
            evt_page: int
            msg_page: int
            def __init__(self, msr: _Optional[int] = ..., control: _Optional[int] = ..., evt_page: _Optional[int] = ..., msg_page: _Optional[int] = ...) -> None: ...
        INIT_FIELD_NUMBER: _ClassVar[int]
        IO_FIELD_NUMBER: _ClassVar[int]
        USER_FIELD_NUMBER: _ClassVar[int]
        HYPERV_CALL_FIELD_NUMBER: _ClassVar[int]
        HYPERV_SYNIC_FIELD_NUMBER: _ClassVar[int]
        init: VcpuResponse.Wait.Init
        io: VcpuResponse.Wait.Io
        user: VcpuResponse.Wait.User
        hyperv_call: VcpuResponse.Wait.HypervCall
        hyperv_synic: VcpuResponse.Wait.HypervSynic
        def __init__(self, init: _Optional[_Union[VcpuResponse.Wait.Init, _Mapping]] = ..., io: _Optional[_Union[VcpuResponse.Wait.Io, _Mapping]] = ..., user: _Optional[_Union[VcpuResponse.Wait.User, _Mapping]] = ..., hyperv_call: _Optional[_Union[VcpuResponse.Wait.HypervCall, _Mapping]] = ..., hyperv_synic: _Optional[_Union[VcpuResponse.Wait.HypervSynic, _Mapping]] = ...) -> None: ...
    class GetState(_message.Message):
        __slots__ = ("state",)
        STATE_FIELD_NUMBER: _ClassVar[int]
        state: bytes
        def __init__(self, state: _Optional[bytes] = ...) -> None: ...
    class SetState(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class CpuidResponse(_message.Message):
        __slots__ = ("entries",)
        ENTRIES_FIELD_NUMBER: _ClassVar[int]
        entries: _containers.RepeatedCompositeFieldContainer[CpuidEntry]
        def __init__(self, entries: _Optional[_Iterable[_Union[CpuidEntry, _Mapping]]] = ...) -> None: ...
    class GetMsrs(_message.Message):
        __slots__ = ("entry_data",)
        ENTRY_DATA_FIELD_NUMBER: _ClassVar[int]
        entry_data: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, entry_data: _Optional[_Iterable[int]] = ...) -> None: ...
    class SetMsrs(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class SetCpuid(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class EnableCapability(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    GET_STATE_FIELD_NUMBER: _ClassVar[int]
    SET_STATE_FIELD_NUMBER: _ClassVar[int]
    GET_MSRS_FIELD_NUMBER: _ClassVar[int]
    SET_MSRS_FIELD_NUMBER: _ClassVar[int]
    SET_CPUID_FIELD_NUMBER: _ClassVar[int]
    GET_HYPERV_CPUID_FIELD_NUMBER: _ClassVar[int]
    ENABLE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    errno: int
    wait: VcpuResponse.Wait
    get_state: VcpuResponse.GetState
    set_state: VcpuResponse.SetState
    get_msrs: VcpuResponse.GetMsrs
    set_msrs: VcpuResponse.SetMsrs
    set_cpuid: VcpuResponse.SetCpuid
    get_hyperv_cpuid: VcpuResponse.CpuidResponse
    enable_capability: VcpuResponse.EnableCapability
    def __init__(self, errno: _Optional[int] = ..., wait: _Optional[_Union[VcpuResponse.Wait, _Mapping]] = ..., get_state: _Optional[_Union[VcpuResponse.GetState, _Mapping]] = ..., set_state: _Optional[_Union[VcpuResponse.SetState, _Mapping]] = ..., get_msrs: _Optional[_Union[VcpuResponse.GetMsrs, _Mapping]] = ..., set_msrs: _Optional[_Union[VcpuResponse.SetMsrs, _Mapping]] = ..., set_cpuid: _Optional[_Union[VcpuResponse.SetCpuid, _Mapping]] = ..., get_hyperv_cpuid: _Optional[_Union[VcpuResponse.CpuidResponse, _Mapping]] = ..., enable_capability: _Optional[_Union[VcpuResponse.EnableCapability, _Mapping]] = ...) -> None: ...
