package pci_test

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/gosandbox/sandbox/virtio/blk"
	"github.com/gosandbox/sandbox/virtio/pci"
	"github.com/gosandbox/sandbox/virtio/rng"
	"github.com/gosandbox/sandbox/virtio/virtiotest"
	"github.com/gosandbox/sandbox/vmm/guestmem"
)

// FuzzPCIConfig replays random config-space and BAR accesses (through
// 0xCF8/0xCFC, ECAM and BAR0, any width) against a bus holding an entropy
// and a block device. Nothing may panic or hang, read-only IDs must stay
// put, and Close must release every interrupt and event.
//
// Each op is 12 bytes: kind, width, 2 bytes of target, 8 bytes of value.
func FuzzPCIConfig(f *testing.F) {
	op := func(kind, width byte, target uint16, value uint64) []byte {
		b := []byte{kind, width}
		b = binary.LittleEndian.AppendUint16(b, target)
		return binary.LittleEndian.AppendUint64(b, value)
	}
	cat := func(ops ...[]byte) []byte { return bytes.Join(ops, nil) }
	// BAR sizing of slot 1 via conf1.
	f.Add(cat(op(0, 2, 1<<11|0x10, 0xffffffff), op(1, 2, 1<<11|0x10, 0)))
	// Enable memory decoding, then bring the device to DRIVER_OK with
	// garbage rings and kick.
	f.Add(cat(op(0, 1, 1<<11|0x04, 6), op(4, 0, 0x14, 1), op(4, 0, 0x14, 3), op(4, 0, 0x14, 0xb),
		op(4, 1, 0x18, 8), op(4, 3, 0x20, 0x1000), op(4, 2, 0x1c, 1), op(4, 0, 0x14, 0xf), op(4, 1, 0x2000, 0)))
	// MSI-X enable and table writes.
	f.Add(cat(op(0, 1, 1<<11|0x04, 6), op(0, 1, 1<<11|0xa6, 0x8000), op(4, 2, 0x3000, 0xfee00000), op(4, 2, 0x300c, 0)))
	// ECAM writes to the BAR and command registers of slot 2.
	f.Add(cat(op(2, 2, 2<<3<<4|0x10, 0xd0000000), op(2, 1, 2<<3<<4|0x04, 2), op(5, 2, 0x1000, 0)))

	f.Fuzz(func(t *testing.T, data []byte) {
		mem, err := guestmem.New(1 << 20)
		if err != nil {
			t.Skip(err)
		}
		defer mem.Close()
		host := virtiotest.NewHost()
		cfg := pci.Config{Mem: mem, Interrupts: host}
		if len(data) > 0 && data[0]&0x80 != 0 {
			cfg.Ioevents = host
		}
		bus, err := pci.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		host.Target = bus
		tr1, _ := bus.AddVirtio(rng.New(nil))
		bd, _ := blk.New(bytes.NewReader(make([]byte, 4096)), blk.Options{Size: 4096, ReadOnly: true})
		tr2, _ := bus.AddVirtio(bd)
		trs := []*pci.Transport{tr1, tr2}
		d := virtiotest.NewPCIDriver(host, mem)
		for len(data) >= 12 && len(data) > 0 {
			kind, width := data[0]%6, 1<<(data[1]%4)
			target := binary.LittleEndian.Uint16(data[2:])
			value := binary.LittleEndian.Uint64(data[4:])
			data = data[12:]
			buf := make([]byte, 8)
			binary.LittleEndian.PutUint64(buf, value)
			slot, reg := int(target>>11)&0x1f, int(target)&0xff
			switch kind {
			case 0, 1: // conf1
				if width == 8 {
					width = 4
				}
				host.WritePort(0xCF8, []byte{byte(reg &^ 3), byte(slot<<3 | int(target>>8)&7), 0, 0x80})
				if kind == 0 {
					host.WritePort(uint16(0xCFC+reg&3), buf[:width])
				} else {
					host.ReadPort(uint16(0xCFC+reg&3), buf[:width])
				}
			case 2, 3: // ECAM, bus 0
				addr := pci.ECAMBase + uint64(target)<<4&0xfffff | uint64(target)&0xf
				if kind == 2 {
					host.WriteMMIO(addr, buf[:width])
				} else {
					host.ReadMMIO(addr, buf[:width])
				}
			case 4, 5: // BAR0 of slot 1 or 2
				tr := trs[int(target>>15)&1]
				addr := tr.BAR() + uint64(target)&(pci.BARSize-1)
				if kind == 4 {
					host.WriteMMIO(addr, buf[:width])
				} else {
					host.ReadMMIO(addr, buf[:width])
				}
			}
		}
		for slot, id := range map[int]uint32{1: 0x10441AF4, 2: 0x10421AF4} {
			if v := d.ConfigRead(slot, 0, 0, 4); v != id {
				t.Fatalf("slot %d ID register %#x", slot, v)
			}
		}
		if err := bus.Close(); err != nil {
			t.Fatal(err)
		}
		if host.LiveMSIs() != 0 || host.Ioevents() != 0 {
			t.Fatalf("after Close: %d MSIs, %d ioevents", host.LiveMSIs(), host.Ioevents())
		}
	})
}
