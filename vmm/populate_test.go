package vmm

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/gosandbox/sandbox/vmm/guestmem"
	"github.com/gosandbox/sandbox/vmm/linuxboot"
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

func TestBootRanges(t *testing.T) {
	const mib = 1 << 20
	img := func(s, e uint64) *linuxboot.Loaded {
		return &linuxboot.Loaded{KernelStart: s, KernelEnd: e}
	}
	withInitrd := img(16*mib, 66*mib)
	withInitrd.InitrdAddr, withInitrd.InitrdSize = 507*mib, 5*mib
	cases := []struct {
		name string
		mem  uint64
		l    *linuxboot.Loaded
		want []memRange
	}{
		// 8 MiB + 1/64 of RAM at the top, then the initramfs.
		{"512 MiB", 512 * mib, withInitrd, []memRange{{16 * mib, 50 * mib}, {496 * mib, 16 * mib}, {507 * mib, 5 * mib}}},
		// Above the PCI hole the top is the last region's.
		{"8 GiB", 8 << 30, img(16*mib, 66*mib), []memRange{{16 * mib, 50 * mib}, {guestmem.MMIOHoleEnd + 8<<30 - guestmem.MMIOHoleStart - 136*mib, 136 * mib}}},
		// Never more than a quarter of RAM.
		{"32 MiB", 32 * mib, img(1*mib, 4*mib), []memRange{{1 * mib, 3 * mib}, {24 * mib, 8 * mib}}},
		// The top range stops at the image's end.
		{"70 MiB", 70 * mib, img(16*mib, 66*mib), []memRange{{16 * mib, 50 * mib}, {66 * mib, 4 * mib}}},
	}
	for _, c := range cases {
		got := bootRanges(guestmem.Layout(c.mem), c.l)
		if fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("%s: bootRanges = %#v, want %#v", c.name, got, c.want)
		}
	}
}
