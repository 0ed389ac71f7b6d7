package pci

import (
	"encoding/binary"

	"github.com/gosandbox/sandbox/virtio"
)

// NoVector is the MSI-X vector value meaning "no interrupt"
// (VIRTIO_MSI_NO_VECTOR).
const NoVector = 0xFFFF

const (
	msixEntrySize   = 16
	msixCtrlMask    = 1 << 14
	msixCtrlEnable  = 1 << 15
	msixVectorMask  = 1
	msixCapBodySize = 10
)

// msixVector is one MSI-X table entry and the interrupt the VMM gave for it.
type msixVector struct {
	entry   [msixEntrySize]byte
	pending bool
	irq     virtio.Interrupt
	irqAddr uint64
	irqData uint32
}

func (v *msixVector) addr() uint64 { return binary.LittleEndian.Uint64(v.entry[0:]) }
func (v *msixVector) data() uint32 { return binary.LittleEndian.Uint32(v.entry[8:]) }
func (v *msixVector) masked() bool {
	return binary.LittleEndian.Uint32(v.entry[12:])&msixVectorMask != 0
}

// msix is a function's MSI-X state: table, PBA and the enable/mask bits
// mirrored from the capability's message control. Guarded by the owner.
type msix struct {
	irqs    virtio.Interrupts
	vectors []msixVector
	enabled bool
	fnMask  bool
	onErr   func(error)
}

func newMSIX(irqs virtio.Interrupts, n int, onErr func(error)) *msix {
	m := &msix{irqs: irqs, vectors: make([]msixVector, n), onErr: onErr}
	for i := range m.vectors {
		// Entries start masked (PCI spec).
		m.vectors[i].entry[12] = msixVectorMask
	}
	return m
}

// setControl applies the message control bits.
func (m *msix) setControl(ctrl uint16) {
	m.enabled = ctrl&msixCtrlEnable != 0
	m.fnMask = ctrl&msixCtrlMask != 0
	for i := range m.vectors {
		m.sync(i)
	}
}

// sync allocates, re-points or releases vector i's interrupt to match the
// table, and delivers a pending message once the vector is unmasked.
func (m *msix) sync(i int) {
	v := &m.vectors[i]
	active := m.enabled && !m.fnMask && !v.masked()
	if v.irq != nil && (!active || v.irqAddr != v.addr() || v.irqData != v.data()) {
		v.irq.Close()
		v.irq = nil
	}
	if !active {
		return
	}
	if v.irq == nil {
		irq, err := m.irqs.MSI(v.addr(), v.data())
		if err != nil {
			m.onErr(err)
			return
		}
		v.irq, v.irqAddr, v.irqData = irq, v.addr(), v.data()
	}
	if v.pending {
		v.pending = false
		if err := v.irq.Trigger(); err != nil {
			m.onErr(err)
		}
	}
}

// fire delivers vector i, or marks it pending while masked. It reports
// false when the vector does not exist.
func (m *msix) fire(i uint16) bool {
	if int(i) >= len(m.vectors) {
		return false
	}
	v := &m.vectors[i]
	if m.fnMask || v.masked() || v.irq == nil {
		v.pending = true
		return true
	}
	if err := v.irq.Trigger(); err != nil {
		m.onErr(err)
	}
	return true
}

func (m *msix) readTable(off uint64, p []byte) {
	for k := range p {
		o := off + uint64(k)
		i := int(o / msixEntrySize)
		if i < len(m.vectors) {
			p[k] = m.vectors[i].entry[o%msixEntrySize]
		} else {
			p[k] = 0
		}
	}
}

func (m *msix) writeTable(off uint64, p []byte) {
	touched := -1
	for k, b := range p {
		o := off + uint64(k)
		i := int(o / msixEntrySize)
		if i >= len(m.vectors) {
			continue
		}
		e := o % msixEntrySize
		if e >= 13 {
			continue // vector control bits 31:1 are reserved
		}
		if e == 12 {
			b &= msixVectorMask
		}
		m.vectors[i].entry[e] = b
		if touched >= 0 && touched != i {
			m.sync(touched)
		}
		touched = i
	}
	if touched >= 0 {
		m.sync(touched)
	}
}

func (m *msix) readPBA(off uint64, p []byte) {
	for k := range p {
		var b byte
		for bit := range 8 {
			i := (int(off)+k)*8 + bit
			if i < len(m.vectors) && m.vectors[i].pending {
				b |= 1 << bit
			}
		}
		p[k] = b
	}
}

// release closes every allocated interrupt.
func (m *msix) release() {
	for i := range m.vectors {
		if v := &m.vectors[i]; v.irq != nil {
			v.irq.Close()
			v.irq = nil
		}
	}
}
