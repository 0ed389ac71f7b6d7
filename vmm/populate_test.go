package vmm

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// rssKiBAt returns the Rss of the mapping of this process that contains
// addr, from /proc/self/smaps.
func rssKiBAt(t *testing.T, addr uintptr) int {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		l := sc.Text()
		var lo, hi uintptr
		if n, _ := fmt.Sscanf(l, "%x-%x ", &lo, &hi); n == 2 {
			in = lo <= addr && addr < hi
			continue
		}
		if in && strings.HasPrefix(l, "Rss:") {
			v, err := strconv.Atoi(strings.Fields(l)[1])
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatalf("no mapping holds %#x", addr)
	return 0
}

func TestPopulateMemoryWhileRunning(t *testing.T) {
	requireKVM(t)
	vm, d := newTestVM(t, 1, nil)
	defer vm.Close()
	if err := vm.Memory().WriteAt(idGuest(0), codeAddr); err != nil {
		t.Fatal(err)
	}
	if err := vm.SetupLongMode(codeAddr, 0); err != nil {
		t.Fatal(err)
	}
	host := vm.Memory().Regions()[0].HostAddr()
	before := rssKiBAt(t, host)
	vm.populate = []memRange{{16 << 20, 8 << 20}}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	if id := <-d.ids; id != 0 {
		t.Fatalf("guest wrote id %d", id)
	}
	vm.bg.Wait()
	after := rssKiBAt(t, host)
	if after-before < 8<<10 {
		t.Errorf("guest memory Rss grew by %d KiB, want at least 8 MiB populated", after-before)
	}
}
