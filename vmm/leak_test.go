package vmm

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// resources counts what a VM could leak: open fds, OS threads, memory
// mappings and goroutines.
type resources struct{ fds, threads, maps, goroutines int }

func countResources(t testing.TB) resources {
	t.Helper()
	var r resources
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	r.fds = len(ents)
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "Threads:"); ok {
			r.threads, _ = strconv.Atoi(strings.TrimSpace(v))
		}
	}
	f.Close()
	m, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	r.maps = strings.Count(string(m), "\n")
	r.goroutines = runtime.NumGoroutine()
	return r
}

// settle waits for exiting goroutines and threads to be gone.
func settle(t testing.TB, want resources) resources {
	var r resources
	for i := 0; i < 100; i++ {
		runtime.GC()
		r = countResources(t)
		if r.goroutines <= want.goroutines && r.threads <= want.threads && r.fds <= want.fds && r.maps <= want.maps {
			return r
		}
		time.Sleep(20 * time.Millisecond)
	}
	return r
}

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
	before := settle(t, resources{})
	before = countResources(t)
	const n = 100
	var guestRanges []string
	for i := 0; i < n; i++ {
		guestRanges = append(guestRanges, runOneVM(t, 2)...)
	}
	after := settle(t, before)
	t.Logf("before %d VMs: %+v; after: %+v", n, before, after)
	if after.fds != before.fds {
		t.Errorf("fds: %d before, %d after %d VMs", before.fds, after.fds, n)
	}
	// The Go runtime may start an idle worker thread (with its stack
	// mapping) while vCPU threads block in KVM_RUN; it keeps at most a few.
	// A per-VM leak would show up n times over.
	// Heap growth moves the count a little either way; the guest memory
	// of every VM is checked exactly below.
	const runtimeSlack = 2
	if after.maps > before.maps+4*runtimeSlack {
		t.Errorf("mappings: %d before, %d after %d VMs", before.maps, after.maps, n)
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
	if after.goroutines > before.goroutines {
		t.Errorf("goroutines: %d before, %d after %d VMs", before.goroutines, after.goroutines, n)
	}
	if after.threads > before.threads+runtimeSlack {
		t.Errorf("threads: %d before, %d after %d VMs", before.threads, after.threads, n)
	}
}
