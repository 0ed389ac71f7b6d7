package pci_test

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/gosandbox/sandbox/virtio/blk"
	"github.com/gosandbox/sandbox/virtio/console"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
)

func ctrlMsg(id uint32, event, value uint16) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint32(b[0:], id)
	binary.LittleEndian.PutUint16(b[4:], event)
	binary.LittleEndian.PutUint16(b[6:], value)
	return b
}

func mustUsed(t *testing.T, v *virtiotest.VirtioPCI, q int) virtiotest.Used {
	t.Helper()
	u, err := v.WaitUsed(q)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func mustAdd(t *testing.T, v *virtiotest.VirtioPCI, q int, out [][]byte, in ...int) {
	t.Helper()
	if _, err := v.Add(q, out, in...); err != nil {
		t.Fatal(err)
	}
}

// TestAgentPortOverPCI runs the console handshake and an echo through the
// whole stack: conf1 enumeration, MSI-X, ioeventfd kicks, the transport and
// the console device.
func TestAgentPortOverPCI(t *testing.T) {
	for _, msix := range []bool{true, false} {
		name := "intx"
		if msix {
			name = "msix"
		}
		t.Run(name, func(t *testing.T) {
			r := newRig(t, true)
			v, err := r.drv.Probe(3)
			if err != nil {
				t.Fatal(err)
			}
			if msix {
				v.MSIXEnable(7)
			}
			if err := v.Init(^uint64(0), 0); err != nil {
				t.Fatal(err)
			}
			for range 4 {
				mustAdd(t, v, 2, nil, 64)
			}
			recv := func() (uint32, uint16, uint16, string) {
				u := mustUsed(t, v, 2)
				mustAdd(t, v, 2, nil, 64)
				w := u.Written
				return binary.LittleEndian.Uint32(w), binary.LittleEndian.Uint16(w[4:]), binary.LittleEndian.Uint16(w[6:]), string(w[8:])
			}
			send := func(id uint32, ev, val uint16) {
				mustAdd(t, v, 3, [][]byte{ctrlMsg(id, ev, val)})
				mustUsed(t, v, 3)
			}
			send(0xffffffff, console.EventDeviceReady, 1)
			for range 2 {
				if _, ev, _, _ := recv(); ev != console.EventDeviceAdd {
					t.Fatalf("event %d, want DEVICE_ADD", ev)
				}
			}
			send(1, console.EventPortReady, 1)
			if id, ev, _, name := recv(); id != 1 || ev != console.EventPortName || name != "gosandbox.agent" {
				t.Fatalf("got %d %d %q, want the port name", id, ev, name)
			}
			if id, ev, val, _ := recv(); id != 1 || ev != console.EventPortOpen || val != 1 {
				t.Fatalf("got %d %d %d, want PORT_OPEN 1", id, ev, val)
			}
			send(1, console.EventPortOpen, 1)
			port := r.cons.Device().(*console.Device).Port("gosandbox.agent")
			if err := port.WaitGuestOpen(context.Background(), true); err != nil {
				t.Fatal(err)
			}
			mustAdd(t, v, 4, nil, 64)
			if _, err := port.Write([]byte("hello guest")); err != nil {
				t.Fatal(err)
			}
			if u := mustUsed(t, v, 4); string(u.Written) != "hello guest" {
				t.Fatalf("guest read %q", u.Written)
			}
			mustAdd(t, v, 5, [][]byte{[]byte("hello host")})
			buf := make([]byte, 64)
			n, err := port.Read(buf)
			if err != nil || string(buf[:n]) != "hello host" {
				t.Fatalf("host read %q, %v", buf[:n], err)
			}
			mustUsed(t, v, 5)
		})
	}
}

func TestBlockOverPCI(t *testing.T) {
	r := newRig(t, true)
	v, err := r.drv.Probe(2)
	if err != nil {
		t.Fatal(err)
	}
	v.MSIXEnable(2)
	if err := v.Init(^uint64(0), 0); err != nil {
		t.Fatal(err)
	}
	if c := r.drv.Read(v.DeviceCfg, 8); c != (1<<20)/512 {
		t.Fatalf("capacity %d", c)
	}
	hdr := func(typ uint32, sector uint64) []byte {
		b := make([]byte, 16)
		binary.LittleEndian.PutUint32(b, typ)
		binary.LittleEndian.PutUint64(b[8:], sector)
		return b
	}
	data := make([]byte, 4096)
	for i := range data {
		data[i] = byte(i * 7)
	}
	mustAdd(t, v, 0, [][]byte{hdr(blk.TypeOut, 8), data}, 1)
	if u := mustUsed(t, v, 0); u.Written[0] != blk.StatusOK {
		t.Fatalf("write status %d", u.Written[0])
	}
	mustAdd(t, v, 0, [][]byte{hdr(blk.TypeIn, 8)}, 4096, 1)
	u := mustUsed(t, v, 0)
	if u.Written[4096] != blk.StatusOK || string(u.Written[:4096]) != string(data) {
		t.Fatalf("read back status %d, equal %v", u.Written[4096], string(u.Written[:4096]) == string(data))
	}
}
