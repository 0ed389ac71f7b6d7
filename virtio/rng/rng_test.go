package rng_test

import (
	"bytes"
	"testing"

	"github.com/gosandbox/sandbox/virtio"
	"github.com/gosandbox/sandbox/virtio/rng"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

func TestFillsBuffers(t *testing.T) {
	h := virtiotest.NewHarness(t, rng.New(nil), virtiotest.HarnessOptions{DataPerQueue: 64 * 128 << 10})
	seen := map[string]bool{}
	for _, n := range []int{1, 16, 4096, 100000} {
		h.Add(0, nil, n)
		u := h.WaitUsed(0)
		want := min(n, rng.MaxRequest)
		if int(u.Len) != want || len(u.Written) != want {
			t.Fatalf("request of %d: used len %d, got %d bytes, want %d", n, u.Len, len(u.Written), want)
		}
		if n >= 16 {
			if bytes.Equal(u.Written, make([]byte, want)) {
				t.Fatalf("request of %d returned zeros", n)
			}
			seen[string(u.Written[:16])] = true
		}
	}
	if len(seen) != 3 {
		t.Fatalf("random prefixes repeated: %d distinct of 3", len(seen))
	}
}

func TestSourceAndSplitBuffers(t *testing.T) {
	src := bytes.NewReader(bytes.Repeat([]byte("0123456789"), 10))
	h := virtiotest.NewHarness(t, rng.New(src), virtiotest.HarnessOptions{})
	h.Add(0, nil, 3, 4)
	u := h.WaitUsed(0)
	if string(u.Written) != "0123456" {
		t.Fatalf("written %q", u.Written)
	}
	// A readable-only chain gets zero bytes back, not an error.
	h.Add(0, [][]byte{[]byte("x")})
	if u := h.WaitUsed(0); u.Len != 0 {
		t.Fatalf("readable-only request: len %d", u.Len)
	}
}

func TestConformance(t *testing.T) {
	virtiotest.TestDevice(t, func(t *testing.T) virtio.Device { return rng.New(nil) }, 0)
}

func BenchmarkEntropy4K(b *testing.B) {
	h := virtiotest.NewHarness(b, rng.New(nil), virtiotest.HarnessOptions{})
	b.SetBytes(4096)
	for b.Loop() {
		h.Add(0, nil, 4096)
		h.WaitUsed(0)
	}
}
