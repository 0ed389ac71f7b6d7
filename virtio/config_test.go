package virtio_test

import (
	"bytes"
	"testing"

	"github.com/gosandbox/sandbox/virtio"
)

func TestReadConfigAt(t *testing.T) {
	cfg := []byte{1, 2, 3, 4}
	for _, tc := range []struct {
		off  int
		n    int
		want []byte
	}{
		{0, 4, []byte{1, 2, 3, 4}},
		{2, 2, []byte{3, 4}},
		{3, 4, []byte{4, 0xee, 0xee, 0xee}}, // past the end: cut short
		{4, 2, []byte{0xee, 0xee}},          // outside: untouched
		{-1, 2, []byte{0xee, 0xee}},
		{1 << 40, 1, []byte{0xee}},
	} {
		p := bytes.Repeat([]byte{0xee}, tc.n)
		virtio.ReadConfigAt(cfg, tc.off, p)
		if !bytes.Equal(p, tc.want) {
			t.Errorf("off %d len %d: %x, want %x", tc.off, tc.n, p, tc.want)
		}
	}
}
