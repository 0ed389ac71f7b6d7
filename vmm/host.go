package vmm

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// DevKVM is the KVM device path.
const DevKVM = "/dev/kvm"

// HostKind says what kind of KVM this host offers.
type HostKind int

// Host kinds.
const (
	HostUnknown  HostKind = iota
	HostHardware          // VMX or SVM hardware virtualization behind /dev/kvm
	HostPVM               // kvm_pvm: runs only PVM guest kernels (and tiny test guests)
	HostNoVirt            // /dev/kvm opens but the CPU has no vmx/svm and no PVM module
)

func (k HostKind) String() string {
	switch k {
	case HostHardware:
		return "hardware KVM"
	case HostPVM:
		return "PVM (kvm_pvm)"
	case HostNoVirt:
		return "KVM without hardware virtualization"
	}
	return "unknown"
}

// Host describes the KVM this process can use.
type Host struct {
	Kind       HostKind
	APIVersion int
	CPUVendor  string // "GenuineIntel", "AuthenticAMD", ...
	MaxVCPUs   int
}

// String describes the host in one line.
func (h *Host) String() string {
	return fmt.Sprintf("%s, KVM API %d, %s, up to %d vCPUs", h.Kind, h.APIVersion, h.CPUVendor, h.MaxVCPUs)
}

// CanBootLinux returns nil when a stock Linux guest can run here, and a
// *HostError (matching ErrKVMUnusable) otherwise.
func (h *Host) CanBootLinux() error {
	switch h.Kind {
	case HostHardware:
		return nil
	case HostPVM:
		return &HostError{Cause: ErrPVMHost, Detail: "module kvm_pvm is loaded and the CPU flags show neither vmx nor svm"}
	default:
		return &HostError{Cause: ErrNoHardwareVirt, Detail: "no vmx or svm in /proc/cpuinfo"}
	}
}

// required lists the capabilities New refuses to run without.
var required = []struct {
	cap  uintptr
	name string
}{
	{capIRQChip, "KVM_CAP_IRQCHIP"},
	{capUserMemory, "KVM_CAP_USER_MEMORY"},
	{capSetTSSAddr, "KVM_CAP_SET_TSS_ADDR"},
	{capExtCPUID, "KVM_CAP_EXT_CPUID"},
	{capIRQRouting, "KVM_CAP_IRQ_ROUTING"},
	{capIRQFD, "KVM_CAP_IRQFD"},
	{capPIT2, "KVM_CAP_PIT2"},
	{capIOEventFD, "KVM_CAP_IOEVENTFD"},
	{capSignalMSI, "KVM_CAP_SIGNAL_MSI"},
	{capImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"},
}

// openKVM opens /dev/kvm with typed errors.
func openKVM() (*os.File, error) {
	f, err := os.OpenFile(DevKVM, os.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case err == nil:
		return f, nil
	case errors.Is(err, fs.ErrNotExist):
		return nil, &HostError{Cause: ErrNoKVM}
	case errors.Is(err, fs.ErrPermission):
		return nil, &HostError{Cause: ErrKVMPermission, Detail: err.Error()}
	}
	return nil, fmt.Errorf("vmm: open %s: %w", DevKVM, err)
}

// Probe opens /dev/kvm, checks the API version and the capabilities the VMM
// needs, and classifies the host. It does not create a VM.
func Probe() (*Host, error) {
	f, err := openKVM()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return probeFD(int(f.Fd()))
}

func probeFD(fd int) (*Host, error) {
	v, err := ioctl(fd, kvmGetAPIVersion, 0)
	if err != nil {
		return nil, kvmErr("KVM_GET_API_VERSION", err)
	}
	if v != 12 {
		return nil, fmt.Errorf("vmm: KVM API version %d, want 12", v)
	}
	for _, c := range required {
		if n, _ := ioctl(fd, kvmCheckExtension, c.cap); n == 0 {
			return nil, &CapabilityError{Name: c.name}
		}
	}
	h := &Host{APIVersion: int(v)}
	if n, _ := ioctl(fd, kvmCheckExtension, capMaxVCPUs); n > 0 {
		h.MaxVCPUs = int(n)
	} else if n, _ := ioctl(fd, kvmCheckExtension, capNrVCPUs); n > 0 {
		h.MaxVCPUs = int(n)
	}
	flags, vendor := cpuFlags()
	h.CPUVendor = vendor
	_, pvmErr := os.Stat("/sys/module/kvm_pvm")
	switch {
	case flags["vmx"] || flags["svm"]:
		h.Kind = HostHardware
	case pvmErr == nil:
		h.Kind = HostPVM
	default:
		h.Kind = HostNoVirt
	}
	return h, nil
}

// cpuFlags reads the first processor's flags and vendor from /proc/cpuinfo.
func cpuFlags() (map[string]bool, string) {
	flags := map[string]bool{}
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return flags, ""
	}
	defer f.Close()
	var vendor string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "vendor_id":
			if vendor == "" {
				vendor = strings.TrimSpace(v)
			}
		case "flags":
			for _, fl := range strings.Fields(v) {
				flags[fl] = true
			}
			return flags, vendor
		}
	}
	return flags, vendor
}
