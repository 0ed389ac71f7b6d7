package console

import (
	"encoding/binary"
	"testing"

	"github.com/gosandbox/sandbox/virtio"
)

// FuzzControl feeds driver control messages (8 bytes each: id, event,
// value) to the control handler and checks the device's answers stay well
// formed: known events, port ids in range, names only for named ports.
func FuzzControl(f *testing.F) {
	msg := func(id uint32, ev, val uint16) []byte {
		b := binary.LittleEndian.AppendUint32(nil, id)
		b = binary.LittleEndian.AppendUint16(b, ev)
		return binary.LittleEndian.AppendUint16(b, val)
	}
	cat := func(ms ...[]byte) []byte {
		var b []byte
		for _, m := range ms {
			b = append(b, m...)
		}
		return b
	}
	f.Add(cat(msg(0xffffffff, EventDeviceReady, 1), msg(0, EventPortReady, 1), msg(1, EventPortReady, 1), msg(1, EventPortOpen, 1)))
	f.Add(cat(msg(1, EventPortReady, 1), msg(0xffffffff, EventDeviceReady, 1), msg(0xffffffff, EventDeviceReady, 1)))
	f.Add(cat(msg(0xffffffff, EventDeviceReady, 1), msg(2, EventPortReady, 1), msg(7, EventPortOpen, 0), msg(1, 99, 1)))

	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := New(Options{Ports: []string{"a", "gosandbox.agent"}})
		if err != nil {
			t.Fatal(err)
		}
		s := &session{a: &virtio.Activation{}, stop: make(chan struct{}), notify: make(chan struct{}, 1)}
		d.sess = s
		for len(data) >= 8 {
			d.handleControl(s, binary.LittleEndian.Uint32(data), binary.LittleEndian.Uint16(data[4:]), binary.LittleEndian.Uint16(data[6:]))
			data = data[8:]
		}
		for _, m := range s.outbox {
			if len(m) < ctrlLen {
				t.Fatalf("short message %x", m)
			}
			id := binary.LittleEndian.Uint32(m)
			ev := binary.LittleEndian.Uint16(m[4:])
			if id >= uint32(len(d.ports)) {
				t.Fatalf("message for port %d of %d", id, len(d.ports))
			}
			switch ev {
			case EventDeviceAdd, EventConsolePort, EventPortOpen:
				if len(m) != ctrlLen {
					t.Fatalf("event %d with %d bytes", ev, len(m))
				}
			case EventPortName:
				if id == 0 || string(m[ctrlLen:]) != d.ports[id].name {
					t.Fatalf("PORT_NAME %q for port %d", m[ctrlLen:], id)
				}
			default:
				t.Fatalf("unexpected event %d", ev)
			}
		}
	})
}
