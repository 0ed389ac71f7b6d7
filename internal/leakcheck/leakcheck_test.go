package leakcheck

import (
	"os"
	"testing"
	"time"
)

func TestCountsSeeAnFDAndAGoroutine(t *testing.T) {
	before, err := Take()
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	go func() { <-stop }()
	during, _ := Take()
	if during.FDs != before.FDs+1 || during.Goroutines != before.Goroutines+1 {
		t.Fatalf("before %v, during %v", before, during)
	}
	f.Close()
	close(stop)
	after, err := Settle(before, 5*time.Second)
	if err != nil || after.FDs != before.FDs || after.Goroutines != before.Goroutines {
		t.Fatalf("before %v, after %v (%v)", before, after, err)
	}
}
