package vmm

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/internal/leakcheck"
)

// runOneVM runs and closes a VM and returns the host ranges its guest
// memory occupied ("start-end" as /proc/self/maps prints them).
func runOneVM(t testing.TB, vcpus int) []string {
	vm, _ := newTestVM(t, vcpus, nil)
	var ranges []string
	for _, r := range vm.Memory().Regions() {
		ranges = append(ranges, fmt.Sprintf("%x-%x ", r.HostAddr(), r.HostAddr()+uintptr(r.Size)))
	}
	for i := 0; i < vcpus; i++ {
		addr := uint64(codeAddr + 0x1000*i)
		if err := vm.Memory().WriteAt(idGuest(uint32(i)), addr); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			if err := vm.SetupLongMode(addr, 0); err != nil {
				t.Fatal(err)
			}
		} else if err := vm.SetupLongModeAP(i, addr); err != nil {
			t.Fatal(err)
		}
	}
	// Close must also wait for the goroutine populating memory (as after
	// LoadLinux), here still running when the VM stops.
	vm.populate = []memRange{{0, vm.Memory().Size()}}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	return ranges
}

func TestCloseLeavesNothingBehind(t *testing.T) {
	requireKVM(t)
	// Warm up: the runtime keeps some idle threads after the first VMs.
	for i := 0; i < 5; i++ {
		runOneVM(t, 2)
	}
	before, err := leakcheck.Settle(leakcheck.Counts{}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	const n = 100
	var guestRanges []string
	for i := 0; i < n; i++ {
		guestRanges = append(guestRanges, runOneVM(t, 2)...)
	}
	// The Go runtime may start an idle worker thread (with its stack
	// mapping) while vCPU threads block in KVM_RUN, and heap growth moves
	// the mapping count a little; a per-VM leak would show up n times over,
	// and every VM's guest memory is checked exactly below.
	want := before
	want.Threads += 2
	want.Maps += 8
	after, err := leakcheck.Settle(want, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("before %d VMs: %v; after: %v", n, before, after)
	if after.FDs != before.FDs || after.Goroutines > before.Goroutines || after.Threads > want.Threads || after.Maps > want.Maps {
		t.Errorf("leak after %d VMs: before %v, after %v", n, before, after)
	}
	m, _ := os.ReadFile("/proc/self/maps")
	if strings.Contains(string(m), "kvm") {
		t.Errorf("a kvm mapping survived Close:\n%s", m)
	}
	for _, r := range guestRanges {
		if strings.Contains(string(m), "\n"+r) || strings.HasPrefix(string(m), r) {
			t.Errorf("guest memory %s is still mapped after Close", r)
		}
	}
}
