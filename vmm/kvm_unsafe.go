package vmm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file holds every unsafe cast of the package: KVM ioctl arguments and
// the shared kvm_run page.

const kvmio = 0xAE

func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | kvmio<<8 | nr }
func io_(nr uintptr) uintptr            { return ioc(0, nr, 0) }
func iow(nr, size uintptr) uintptr      { return ioc(1, nr, size) }
func ior(nr, size uintptr) uintptr      { return ioc(2, nr, size) }
func iowr(nr, size uintptr) uintptr     { return ioc(3, nr, size) }

var (
	kvmGetAPIVersion       = io_(0x00)
	kvmCreateVM            = io_(0x01)
	kvmCheckExtension      = io_(0x03)
	kvmGetVCPUMmapSize     = io_(0x04)
	kvmGetSupportedCPUID   = iowr(0x05, 8)
	kvmCreateVCPU          = io_(0x41)
	kvmSetUserMemoryRegion = iow(0x46, unsafe.Sizeof(userMemoryRegion{}))
	kvmSetTSSAddr          = io_(0x47)
	kvmSetIdentityMapAddr  = iow(0x48, 8)
	kvmCreateIRQChip       = io_(0x60)
	kvmIRQLine             = iow(0x61, unsafe.Sizeof(irqLevel{}))
	kvmSetGSIRouting       = iow(0x6a, 8)
	kvmIRQFD               = iow(0x76, unsafe.Sizeof(irqfdArg{}))
	kvmCreatePIT2          = iow(0x77, unsafe.Sizeof(pitConfig{}))
	kvmIOEventFD           = iow(0x79, unsafe.Sizeof(ioeventfdArg{}))
	kvmRun                 = io_(0x80)
	kvmGetRegs             = ior(0x81, unsafe.Sizeof(Regs{}))
	kvmSetRegs             = iow(0x82, unsafe.Sizeof(Regs{}))
	kvmGetSregs            = ior(0x83, unsafe.Sizeof(Sregs{}))
	kvmSetSregs            = iow(0x84, unsafe.Sizeof(Sregs{}))
	kvmSetMSRs             = iow(0x89, 8)
	kvmSetFPU              = iow(0x8d, unsafe.Sizeof(fpu{}))
	kvmGetLAPIC            = ior(0x8e, unsafe.Sizeof(lapicState{}))
	kvmSetLAPIC            = iow(0x8f, unsafe.Sizeof(lapicState{}))
	kvmSetCPUID2           = iow(0x90, 8)
	kvmSignalMSI           = iow(0xa5, unsafe.Sizeof(msiArg{}))
)

// KVM capability numbers (KVM_CAP_*).
const (
	capIRQChip       = 0
	capHLT           = 1
	capUserMemory    = 3
	capSetTSSAddr    = 4
	capExtCPUID      = 7
	capNrVCPUs       = 9
	capNrMemSlots    = 10
	capIRQRouting    = 25
	capIRQFD         = 32
	capPIT2          = 33
	capIOEventFD     = 36
	capMaxVCPUs      = 66
	capTSCDeadline   = 72
	capSignalMSI     = 77
	capImmediateExit = 136
)

// Exit reasons (KVM_EXIT_*).
const (
	exitUnknown       = 0
	exitException     = 1
	exitIO            = 2
	exitHypercall     = 3
	exitDebug         = 4
	exitHLT           = 5
	exitMMIO          = 6
	exitIRQWindowOpen = 7
	exitShutdown      = 8
	exitFailEntry     = 9
	exitIntr          = 10
	exitNMI           = 16
	exitInternalError = 17
	exitSystemEvent   = 24
)

type userMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

type irqLevel struct {
	IRQ   uint32
	Level uint32
}

type pitConfig struct {
	Flags uint32
	_     [15]uint32
}

type irqfdArg struct {
	FD         uint32
	GSI        uint32
	Flags      uint32
	ResampleFD uint32
	_          [16]uint8
}

const irqfdFlagDeassign = 1

type ioeventfdArg struct {
	Datamatch uint64
	Addr      uint64
	Len       uint32
	FD        int32
	Flags     uint32
	_         [36]uint8
}

const (
	ioeventfdFlagDatamatch = 1 << 0
	ioeventfdFlagPIO       = 1 << 1
	ioeventfdFlagDeassign  = 1 << 2
)

type msiArg struct {
	AddressLo uint32
	AddressHi uint32
	Data      uint32
	Flags     uint32
	DevID     uint32
	_         [12]uint8
}

// routingEntry is struct kvm_irq_routing_entry (48 bytes).
type routingEntry struct {
	GSI   uint32
	Type  uint32
	Flags uint32
	_     uint32
	U     [8]uint32
}

const (
	routingIRQChip = 1
	routingMSI     = 2
)

// Regs is struct kvm_regs: the general-purpose registers of a vCPU.
type Regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// Segment is struct kvm_segment.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable is struct kvm_dtable (a GDT or IDT pointer).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs: segment and control registers of a vCPU.
type Sregs struct {
	CS, DS, ES, FS, GS, SS, TR, LDT Segment
	GDT, IDT                        DTable
	CR0, CR2, CR3, CR4, CR8         uint64
	EFER                            uint64
	APICBase                        uint64
	InterruptBitmap                 [4]uint64
}

type fpu struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

type lapicState struct {
	Regs [1024]byte
}

// cpuidEntry is struct kvm_cpuid_entry2.
type cpuidEntry struct {
	Function uint32
	Index    uint32
	Flags    uint32
	EAX      uint32
	EBX      uint32
	ECX      uint32
	EDX      uint32
	_        [3]uint32
}

const cpuidFlagSignificantIndex = 1

type msrEntry struct {
	Index uint32
	_     uint32
	Data  uint64
}

// Compile-time checks of the kernel ABI sizes.
var (
	_ [32]byte   = [unsafe.Sizeof(userMemoryRegion{})]byte{}
	_ [64]byte   = [unsafe.Sizeof(pitConfig{})]byte{}
	_ [32]byte   = [unsafe.Sizeof(irqfdArg{})]byte{}
	_ [64]byte   = [unsafe.Sizeof(ioeventfdArg{})]byte{}
	_ [32]byte   = [unsafe.Sizeof(msiArg{})]byte{}
	_ [48]byte   = [unsafe.Sizeof(routingEntry{})]byte{}
	_ [144]byte  = [unsafe.Sizeof(Regs{})]byte{}
	_ [24]byte   = [unsafe.Sizeof(Segment{})]byte{}
	_ [312]byte  = [unsafe.Sizeof(Sregs{})]byte{}
	_ [416]byte  = [unsafe.Sizeof(fpu{})]byte{}
	_ [40]byte   = [unsafe.Sizeof(cpuidEntry{})]byte{}
	_ [16]byte   = [unsafe.Sizeof(msrEntry{})]byte{}
	_ [1024]byte = [unsafe.Sizeof(lapicState{})]byte{}
)

func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if e != 0 {
		return r, e
	}
	return r, nil
}

// ioctlRetry is ioctl that retries on EINTR (for calls other than KVM_RUN).
func ioctlRetry(fd int, req, arg uintptr) (uintptr, error) {
	for {
		r, err := ioctl(fd, req, arg)
		if err != unix.EINTR {
			return r, err
		}
	}
}

func ioctlPtr[T any](fd int, req uintptr, p *T) error {
	_, err := ioctlRetry(fd, req, uintptr(unsafe.Pointer(p)))
	return err
}

func setUserMemoryRegion(vmfd int, r *userMemoryRegion) error {
	return ioctlPtr(vmfd, kvmSetUserMemoryRegion, r)
}

func getSupportedCPUID(kvmfd int) ([]cpuidEntry, error) {
	for n := 256; n <= 4096; n *= 2 {
		buf := make([]byte, 8+n*int(unsafe.Sizeof(cpuidEntry{})))
		*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(n)
		_, err := ioctlRetry(kvmfd, kvmGetSupportedCPUID, uintptr(unsafe.Pointer(&buf[0])))
		if err == unix.E2BIG {
			continue
		}
		if err != nil {
			return nil, err
		}
		got := int(*(*uint32)(unsafe.Pointer(&buf[0])))
		if got > n {
			return nil, fmt.Errorf("KVM returned %d CPUID entries for a buffer of %d", got, n)
		}
		entries := make([]cpuidEntry, got)
		copy(entries, unsafe.Slice((*cpuidEntry)(unsafe.Pointer(&buf[8])), got))
		return entries, nil
	}
	return nil, unix.E2BIG
}

func setCPUID(vcpufd int, entries []cpuidEntry) error {
	size := int(unsafe.Sizeof(cpuidEntry{}))
	buf := make([]byte, 8+len(entries)*size)
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(len(entries))
	if len(entries) > 0 {
		copy(unsafe.Slice((*cpuidEntry)(unsafe.Pointer(&buf[8])), len(entries)), entries)
	}
	_, err := ioctlRetry(vcpufd, kvmSetCPUID2, uintptr(unsafe.Pointer(&buf[0])))
	return err
}

func setMSRs(vcpufd int, entries []msrEntry) (int, error) {
	size := int(unsafe.Sizeof(msrEntry{}))
	buf := make([]byte, 8+len(entries)*size)
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(len(entries))
	if len(entries) > 0 {
		copy(unsafe.Slice((*msrEntry)(unsafe.Pointer(&buf[8])), len(entries)), entries)
	}
	n, err := ioctlRetry(vcpufd, kvmSetMSRs, uintptr(unsafe.Pointer(&buf[0])))
	return int(n), err
}

func setGSIRouting(vmfd int, entries []routingEntry) error {
	size := int(unsafe.Sizeof(routingEntry{}))
	buf := make([]byte, 8+len(entries)*size)
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(len(entries))
	if len(entries) > 0 {
		copy(unsafe.Slice((*routingEntry)(unsafe.Pointer(&buf[8])), len(entries)), entries)
	}
	_, err := ioctlRetry(vmfd, kvmSetGSIRouting, uintptr(unsafe.Pointer(&buf[0])))
	return err
}

// runPage is the vCPU's mmap'd struct kvm_run.
type runPage struct {
	mem []byte
}

func (r runPage) setImmediateExit(v uint8) {
	// immediate_exit is byte 1; a plain byte store is what the kernel reads.
	p := (*uint8)(unsafe.Pointer(&r.mem[1]))
	*p = v
}

func (r runPage) exitReason() uint32 { return *(*uint32)(unsafe.Pointer(&r.mem[8])) }

// ioExit is the io member of the kvm_run exit union.
type ioExit struct {
	Direction  uint8
	Size       uint8
	Port       uint16
	Count      uint32
	DataOffset uint64
}

func (r runPage) io() ioExit { return *(*ioExit)(unsafe.Pointer(&r.mem[32])) }

// mmioExit is the mmio member of the kvm_run exit union.
type mmioExit struct {
	PhysAddr uint64
	Data     [8]byte
	Len      uint32
	IsWrite  uint8
}

func (r runPage) mmio() *mmioExit { return (*mmioExit)(unsafe.Pointer(&r.mem[32])) }

// exitData returns n 64-bit words of the exit union starting at byte off of
// the union (for internal_error, system_event and fail_entry).
func (r runPage) exitWords(off, n int) []uint64 {
	out := make([]uint64, n)
	for i := range out {
		out[i] = *(*uint64)(unsafe.Pointer(&r.mem[32+off+8*i]))
	}
	return out
}

func (r runPage) exitU32(off int) uint32 { return *(*uint32)(unsafe.Pointer(&r.mem[32+off])) }

func lapicGet(vcpufd int) (*lapicState, error) {
	var s lapicState
	return &s, ioctlPtr(vcpufd, kvmGetLAPIC, &s)
}

func lapicSet(vcpufd int, s *lapicState) error { return ioctlPtr(vcpufd, kvmSetLAPIC, s) }

func signalMSI(vmfd int, addr uint64, data uint32) (int, error) {
	m := msiArg{AddressLo: uint32(addr), AddressHi: uint32(addr >> 32), Data: data}
	n, err := ioctlRetry(vmfd, kvmSignalMSI, uintptr(unsafe.Pointer(&m)))
	return int(n), err
}

var (
	kvmGetMPState = ior(0x98, 4)
	kvmSetMPState = iow(0x99, 4)
)

func getMPState(vcpufd int) (uint32, error) {
	var state uint32
	return state, ioctlPtr(vcpufd, kvmGetMPState, &state)
}

// mpStateRunnable is KVM_MP_STATE_RUNNABLE.
const mpStateRunnable = 0

func setMPState(vcpufd int, state uint32) error { return ioctlPtr(vcpufd, kvmSetMPState, &state) }
