package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// requireKVM skips tests of VMM mechanics where /dev/kvm cannot be opened
// at all (they run on PVM and hardware KVM alike).
func requireKVM(t testing.TB) *Host {
	t.Helper()
	h, err := Probe()
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("KVM is required in CI: %v", err)
		}
		t.Skipf("no usable /dev/kvm: %v", err)
	}
	return h
}

// testDev is a port and MMIO device that records accesses.
type testDev struct {
	mu     sync.Mutex
	mmio   map[uint64]uint32
	ports  []uint32
	ids    chan uint32
	readIn uint32
}

func (d *testDev) ReadPort(port uint16, data []byte) {
	binary.LittleEndian.PutUint32(data, d.readIn)
}

func (d *testDev) WritePort(port uint16, data []byte) {
	v := binary.LittleEndian.Uint32(data)
	if port == 0x501 {
		d.ids <- v
		return
	}
	d.mu.Lock()
	d.ports = append(d.ports, v)
	d.mu.Unlock()
}

func (d *testDev) ReadMMIO(addr uint64, data []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	binary.LittleEndian.PutUint32(data, d.mmio[addr]+1)
}

func (d *testDev) WriteMMIO(addr uint64, data []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mmio[addr] = binary.LittleEndian.Uint32(data)
}

const codeAddr = 0x100000

// ioGuest writes "Hi\n" to COM1, writes 0x12345678 to MMIO 0x30000000,
// reads it back (the device adds 1), sends it to port 0x500, reads port
// 0x500 and echoes it back there, then resets through the i8042.
var ioGuest = []byte{
	0xb0, 'H', // mov al,'H'
	0x66, 0xba, 0xf8, 0x03, // mov dx,0x3f8
	0xee,      // out dx,al
	0xb0, 'i', // mov al,'i'
	0xee,
	0xb0, '\n',
	0xee,
	0xbb, 0x00, 0x00, 0x00, 0x30, // mov ebx,0x30000000
	0xc7, 0x03, 0x78, 0x56, 0x34, 0x12, // mov dword [rbx],0x12345678
	0x8b, 0x03, // mov eax,[rbx]
	0x66, 0xba, 0x00, 0x05, // mov dx,0x500
	0xef,       // out dx,eax
	0xed,       // in eax,dx
	0xef,       // out dx,eax
	0xb0, 0xfe, // mov al,0xfe
	0xe6, 0x64, // out 0x64,al
	0xf4, // hlt
}

// idGuest(i) reports i on port 0x501 and halts forever with interrupts off.
func idGuest(i uint32) []byte {
	b := []byte{0xb8, 0, 0, 0, 0, 0x66, 0xba, 0x01, 0x05, 0xef, 0xf4, 0xeb, 0xfd}
	binary.LittleEndian.PutUint32(b[1:], i)
	return b
}

func newTestVM(t testing.TB, vcpus int, console *bytes.Buffer) (*VM, *testDev) {
	t.Helper()
	cfg := Config{Memory: 64 << 20, VCPUs: vcpus}
	if console != nil {
		cfg.Console = console
	}
	vm, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	d := &testDev{mmio: map[uint64]uint32{}, ids: make(chan uint32, 64), readIn: 0xcafef00d}
	if err := vm.Bus().AddPort(0x500, 2, d); err != nil {
		t.Fatal(err)
	}
	if err := vm.Bus().AddMMIO(0x30000000, 0x1000, d); err != nil {
		t.Fatal(err)
	}
	return vm, d
}

func TestPortAndMMIOExits(t *testing.T) {
	requireKVM(t)
	var con bytes.Buffer
	vm, d := newTestVM(t, 1, &con)
	defer vm.Close()
	if err := vm.Memory().WriteAt(ioGuest, codeAddr); err != nil {
		t.Fatal(err)
	}
	if err := vm.SetupLongMode(codeAddr, 0); err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ex, err := vm.Wait(ctx)
	if err != nil {
		t.Fatalf("Wait: %v (console %q)", err, vm.ConsoleLog())
	}
	if ex.Reason != ExitReset {
		t.Fatalf("exit = %v, want reset", ex)
	}
	if ex.AsError() != nil {
		t.Fatalf("clean exit gave error %v", ex.AsError())
	}
	if got := con.String(); got != "Hi\n" {
		t.Errorf("console = %q, want %q", got, "Hi\n")
	}
	if got := string(vm.ConsoleLog()); got != "Hi\n" {
		t.Errorf("console log = %q", got)
	}
	if d.mmio[0x30000000] != 0x12345678 {
		t.Errorf("MMIO write = %#x", d.mmio[0x30000000])
	}
	want := []uint32{0x12345679, 0xcafef00d}
	if len(d.ports) != 2 || d.ports[0] != want[0] || d.ports[1] != want[1] {
		t.Errorf("port writes = %#x, want %#x", d.ports, want)
	}
	if vm.Phases().ToFirstRun() <= 0 {
		t.Errorf("first KVM_RUN not recorded: %+v", vm.Phases())
	}
	if n := vm.Exits()[0]; n < 8 {
		t.Errorf("exits = %d, want >= 8", n)
	}
}

func TestVCPUsRunAndStopWhileHalted(t *testing.T) {
	requireKVM(t)
	for _, n := range []int{1, 4} {
		t.Run(strings.Repeat("v", n), func(t *testing.T) {
			vm, d := newTestVM(t, n, nil)
			defer vm.Close()
			for i := 0; i < n; i++ {
				addr := uint64(codeAddr + 0x1000*i)
				if err := vm.Memory().WriteAt(idGuest(uint32(i)), addr); err != nil {
					t.Fatal(err)
				}
				var err error
				if i == 0 {
					err = vm.SetupLongMode(addr, 0)
				} else {
					err = vm.SetupLongModeAP(i, addr)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := vm.Start(); err != nil {
				t.Fatal(err)
			}
			seen := map[uint32]bool{}
			timeout := time.After(30 * time.Second)
			for len(seen) < n {
				select {
				case id := <-d.ids:
					seen[id] = true
				case <-timeout:
					t.Fatalf("only vCPUs %v reported", seen)
				}
			}
			// Every vCPU is now halted with interrupts off: VCPUStates
			// looks at them without ending the VM, and Stop must still
			// force them out.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var states []VCPUState
			for try := 0; try < 300; try++ { // the hlt may not have run yet
				var err error
				if states, err = vm.VCPUStates(ctx); err != nil {
					t.Fatalf("VCPUStates: %v", err)
				}
				if allHalted(states) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			if len(states) != n || !allHalted(states) {
				t.Fatalf("VCPUStates = %v, want %d halted vCPUs", states, n)
			}
			for i, st := range states {
				// RIP is past the hlt (byte 10 of idGuest), at the jmp.
				if want := uint64(codeAddr + 0x1000*i + 11); st.RIP != want || st.ID != i || st.RFLAGS&(1<<9) != 0 {
					t.Errorf("vCPU %d: %v, want rip %#x with interrupts off", i, st, want)
				}
			}
			select {
			case <-vm.Done():
				t.Fatal("VCPUStates ended the VM")
			default:
			}
			if err := vm.Stop(ctx); err != nil {
				t.Fatalf("Stop: %v", err)
			}
			ex, err := vm.Wait(ctx)
			if err != nil || ex.Reason != ExitStopped {
				t.Fatalf("Wait = %v, %v; want stopped", ex, err)
			}
			if !errors.Is(ex.AsError(), ErrStoppedByHost) {
				t.Fatalf("AsError = %v", ex.AsError())
			}
			if err := vm.Close(); err != nil {
				t.Fatal(err)
			}
			if err := vm.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
		})
	}
}

func TestConfigValidation(t *testing.T) {
	for _, c := range []Config{
		{Memory: 4097},
		{Memory: 1 << 20},
		{VCPUs: -1},
		{VCPUs: MaxVCPUs + 1},
	} {
		_, err := New(c)
		var ce *ConfigError
		if !errors.As(err, &ce) || !errors.Is(err, ErrConfig) {
			t.Errorf("New(%+v) = %v, want *ConfigError", c, err)
		}
	}
}

func allHalted(states []VCPUState) bool {
	for _, s := range states {
		if s.MPState != "halted" {
			return false
		}
	}
	return len(states) > 0
}
