package vmm

import (
	"bytes"
	"io"
	"sync"
)

// COM1 is the I/O base and IRQ of the first 8250 UART.
const (
	COM1Port = 0x3f8
	COM1IRQ  = 4
)

// 8250 register offsets and bits used here.
const (
	uartRX, uartTX   = 0, 0
	uartIER          = 1
	uartIIR, uartFCR = 2, 2
	uartLCR          = 3
	uartMCR          = 4
	uartLSR          = 5
	uartMSR          = 6
	uartSCR          = 7

	uartIERRDI  = 0x01
	uartIERTHRI = 0x02
	uartLCRDLAB = 0x80
	uartMCRLoop = 0x10
	uartLSRDR   = 0x01
	uartLSRTHRE = 0x20
	uartLSRTEMT = 0x40
	uartIIRNone = 0x01
	uartIIRTHRI = 0x02
	uartIIRRDI  = 0x04
)

// Serial is a 16550A-compatible UART that sends what the guest writes to an
// io.Writer and keeps the tail of it in a bounded log. Input is optional.
type Serial struct {
	mu      sync.Mutex
	out     io.Writer // may be nil
	log     *RingLog
	irq     func()       // pulses the UART's interrupt line; may be nil
	onLine  func(string) // called for every complete output line; may be nil
	line    []byte
	in      []byte // pending input bytes
	ier     uint8
	lcr     uint8
	mcr     uint8
	scr     uint8
	dll     uint8
	dlm     uint8
	fcr     uint8
	thrIntr bool // a THR-empty interrupt is pending
}

// NewSerial returns a UART writing to out (nil to drop) and log (nil for
// none). irq pulses its interrupt line; onLine sees each output line.
func NewSerial(out io.Writer, log *RingLog, irq func(), onLine func(string)) *Serial {
	return &Serial{out: out, log: log, irq: irq, onLine: onLine, dll: 0x0c}
}

// Input queues bytes for the guest to read.
func (s *Serial) Input(p []byte) {
	s.mu.Lock()
	s.in = append(s.in, p...)
	fire := s.ier&uartIERRDI != 0
	s.mu.Unlock()
	if fire && s.irq != nil {
		s.irq()
	}
}

// ReadPort implements PortDevice.
func (s *Serial) ReadPort(port uint16, data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var v uint8
	switch port - COM1Port {
	case uartRX:
		if s.lcr&uartLCRDLAB != 0 {
			v = s.dll
		} else if len(s.in) > 0 {
			v = s.in[0]
			s.in = s.in[1:]
		}
	case uartIER:
		if s.lcr&uartLCRDLAB != 0 {
			v = s.dlm
		} else {
			v = s.ier
		}
	case uartIIR:
		v = uartIIRNone
		switch {
		case s.ier&uartIERRDI != 0 && len(s.in) > 0:
			v = uartIIRRDI
		case s.ier&uartIERTHRI != 0 && s.thrIntr:
			v = uartIIRTHRI
			s.thrIntr = false
		}
		if s.fcr&1 != 0 {
			v |= 0xc0
		}
	case uartLCR:
		v = s.lcr
	case uartMCR:
		v = s.mcr
	case uartLSR:
		v = uartLSRTHRE | uartLSRTEMT
		if len(s.in) > 0 {
			v |= uartLSRDR
		}
	case uartMSR:
		if s.mcr&uartMCRLoop != 0 {
			// Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
			m := s.mcr
			v = (m&0x01)<<5 | (m&0x02)<<3 | (m&0x04)<<4 | (m&0x08)<<4
		} else {
			v = 0xb0 // DCD, DSR, CTS
		}
	case uartSCR:
		v = s.scr
	}
	data[0] = v
}

// WritePort implements PortDevice.
func (s *Serial) WritePort(port uint16, data []byte) {
	v := data[0]
	s.mu.Lock()
	fire := false
	switch port - COM1Port {
	case uartTX:
		if s.lcr&uartLCRDLAB != 0 {
			s.dll = v
			break
		}
		if s.mcr&uartMCRLoop != 0 {
			s.in = append(s.in, v)
		} else {
			s.emit(v)
		}
		if s.ier&uartIERTHRI != 0 {
			s.thrIntr, fire = true, true
		}
	case uartIER:
		if s.lcr&uartLCRDLAB != 0 {
			s.dlm = v
			break
		}
		old := s.ier
		s.ier = v & 0x0f
		if s.ier&uartIERTHRI != 0 && old&uartIERTHRI == 0 {
			s.thrIntr, fire = true, true
		}
	case uartFCR:
		s.fcr = v
	case uartLCR:
		s.lcr = v
	case uartMCR:
		s.mcr = v
	case uartSCR:
		s.scr = v
	}
	s.mu.Unlock()
	if fire && s.irq != nil {
		s.irq()
	}
}

// emit handles one output byte; s.mu is held.
func (s *Serial) emit(b byte) {
	if s.out != nil {
		s.out.Write([]byte{b})
	}
	if s.log != nil {
		s.log.Write([]byte{b})
	}
	if s.onLine == nil {
		return
	}
	if b == '\n' {
		s.onLine(string(bytes.TrimRight(s.line, "\r")))
		s.line = s.line[:0]
		return
	}
	if len(s.line) < 4096 {
		s.line = append(s.line, b)
	}
}

// RingLog keeps the last Size bytes written to it. It is safe for
// concurrent use.
type RingLog struct {
	mu    sync.Mutex
	buf   []byte
	start int // index of the oldest byte when full
	full  bool
	total int64
}

// NewRingLog returns a log that keeps the last size bytes.
func NewRingLog(size int) *RingLog {
	if size <= 0 {
		size = 64 << 10
	}
	return &RingLog{buf: make([]byte, 0, size)}
}

// Write appends p, dropping the oldest bytes beyond the capacity.
func (r *RingLog) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.total += int64(len(p))
	c := cap(r.buf)
	for _, b := range p {
		if !r.full {
			r.buf = append(r.buf, b)
			if len(r.buf) == c {
				r.full = true
			}
			continue
		}
		r.buf[r.start] = b
		r.start = (r.start + 1) % c
	}
	return len(p), nil
}

// Bytes returns a copy of the kept bytes, oldest first.
func (r *RingLog) Bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.full {
		return append([]byte(nil), r.buf...)
	}
	out := make([]byte, 0, len(r.buf))
	out = append(out, r.buf[r.start:]...)
	return append(out, r.buf[:r.start]...)
}

// Total returns how many bytes were ever written.
func (r *RingLog) Total() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}
