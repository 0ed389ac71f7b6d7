// Package leakcheck counts what a VM or sandbox could leak in this process
// (open fds, OS threads, memory mappings, goroutines), for tests that
// create and close many of them and compare the counts exactly.
package leakcheck

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Counts is a snapshot of the process's resources.
type Counts struct {
	FDs, Threads, Maps, Goroutines int
}

func (c Counts) String() string {
	return fmt.Sprintf("fds=%d threads=%d maps=%d goroutines=%d", c.FDs, c.Threads, c.Maps, c.Goroutines)
}

// Take counts the resources now.
func Take() (Counts, error) {
	var c Counts
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return c, err
	}
	c.FDs = len(ents) - 1 // the directory being read
	st, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return c, err
	}
	for _, l := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(l, "Threads:"); ok {
			c.Threads, _ = strconv.Atoi(strings.TrimSpace(v))
		}
	}
	m, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return c, err
	}
	c.Maps = strings.Count(string(m), "\n")
	c.Goroutines = runtime.NumGoroutine()
	return c, nil
}

// Settle waits up to d for the counts to drop to at most want (goroutines
// and threads of closed VMs take a moment to end) and returns the last
// counts.
func Settle(want Counts, d time.Duration) (Counts, error) {
	deadline := time.Now().Add(d)
	for {
		runtime.GC()
		c, err := Take()
		if err != nil || (c.FDs <= want.FDs && c.Threads <= want.Threads && c.Maps <= want.Maps && c.Goroutines <= want.Goroutines) || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Mapped reports whether a mapping starting at addr exists.
func Mapped(addr uintptr) (bool, error) {
	m, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return false, err
	}
	prefix := fmt.Sprintf("%x-", addr)
	for _, l := range strings.Split(string(m), "\n") {
		if strings.HasPrefix(l, prefix) {
			return true, nil
		}
	}
	return false, nil
}
