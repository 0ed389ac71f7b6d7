package p9_test

import (
	"encoding/binary"
	"testing"
)

// fuzzRecord encodes one chain for FuzzChains: in[2] split[1] len[2] out.
func fuzzRecord(out []byte, in uint16, split uint8) []byte {
	b := binary.LittleEndian.AppendUint16(nil, in)
	b = append(b, split)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(out)))
	return append(b, out...)
}

func fuzzSeq(recs ...[]byte) []byte {
	var b []byte
	for _, r := range recs {
		b = append(b, r...)
	}
	return b
}

// FuzzChains feeds arbitrary descriptor chains, one after the other, to a
// device serving a static tree. Every chain must come back (no hang), with
// no more bytes than its writable part, and when it carries an answer, the
// answer is one well-framed R-message under the request's tag, of the
// request's reply type or Rlerror. The device must never fail: with one
// request at a time every answer can be attributed.
func FuzzChains(f *testing.F) {
	const in = 4096
	f.Add(fuzzSeq(
		fuzzRecord(tversion(0xffff, rawMsize), in, 0),
		fuzzRecord(tattach(1, 1), in, 3),
		fuzzRecord(twalk(2, 1, 2, "b.txt"), in, 0),
		fuzzRecord(tlopen(3, 2), in, 0),
		fuzzRecord(tread(4, 2, 0, 3000), in, 9),
		fuzzRecord(tread(5, 2, 9000, 3000), 100, 0),
		fuzzRecord(tclunk(6, 2), in, 0),
	))
	f.Add(fuzzSeq(
		fuzzRecord(tversion(0xffff, 1<<30), in, 0),
		fuzzRecord(tattach(1, 1), in, 0),
		fuzzRecord(twalk(2, 1, 2), in, 0),
		fuzzRecord(tlopen(3, 2), in, 0),
		fuzzRecord(msg(40, 4, u32(2), u64(0), u32(2000)), in, 0), // Treaddir
		fuzzRecord(tflush(5, 4), in, 0),
		fuzzRecord(tflush(6, 6), in, 0),
	))
	f.Add(fuzzSeq(
		fuzzRecord(msg(tTread, 9, []byte{1, 2, 3}), in, 0),
		fuzzRecord([]byte{0xff, 0xff, 0xff, 0xff, 100, 0xff, 0xff}, in, 2),
		fuzzRecord(tclunk(0xffff, 1), in, 0),
		fuzzRecord(tversion(0xffff, 0), 11, 0),
		fuzzRecord([]byte{1, 2}, 0, 0),
		fuzzRecord(msg(tTwalk, 7, u32(1), u32(1), u16(3), str(".."), str("a.txt")), 8, 0),
	))
	f.Add(fuzzSeq(
		fuzzRecord(tversion(0xffff, rawMsize), in, 0),
		fuzzRecord(tattach(1, 1), in, 0),
		fuzzRecord(msg(30, 2, u32(1), u32(3), str("user.x")), in, 0),             // Txattrwalk
		fuzzRecord(msg(32, 3, u32(1), str("user.y"), u64(1<<62), u32(0)), in, 0), // Txattrcreate
		fuzzRecord(msg(118, 4, u32(1), u64(0), u32(5), []byte("hello")), in, 0),  // Twrite
		fuzzRecord(msg(24, 5, u32(1), u64(0x3fff)), in, 0),                       // Tgetattr
		fuzzRecord(msg(8, 6, u32(1)), in, 0),                                     // Tstatfs
	))
	// Concurrent mode ('C' prefix): everything in flight at once.
	f.Add(append([]byte("C"), fuzzSeq(
		fuzzRecord(tversion(0xffff, rawMsize), in, 0),
		fuzzRecord(tattach(1, 1), in, 0),
		fuzzRecord(tattach(1, 2), in, 0),
		fuzzRecord(tflush(2, 1), in, 0),
		fuzzRecord(tflush(3, 2), in, 0),
		fuzzRecord(twalk(4, 1, 5, "a.txt"), in, 0),
		fuzzRecord(msg(tTread, 5, []byte{1}), in, 0),
		fuzzRecord(tversion(0xffff, 4096), in, 0),
	)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 0 && data[0] == 'C' {
			fuzzConcurrent(t, data[1:])
			return
		}
		r := newRaw(t, staticTree(t))
		for n := 0; len(data) >= 5 && n < 48; n++ {
			inLen := int(binary.LittleEndian.Uint16(data))
			split := int(data[2])
			outLen := int(binary.LittleEndian.Uint16(data[3:]))
			data = data[5:]
			outLen = min(outLen, len(data))
			out := data[:outLen]
			data = data[outLen:]
			inLen = min(inLen, 16<<10)
			var bufs [][]byte
			if split > 0 && split < len(out) {
				bufs = [][]byte{out[:split], out[split:]}
			} else if len(out) > 0 {
				bufs = [][]byte{out}
			}
			if len(bufs) == 0 && inLen == 0 {
				continue
			}
			var ins []int
			if inLen > 0 {
				ins = []int{inLen}
			}
			r.h.Add(0, bufs, ins...)
			u := r.h.WaitUsed(0)
			if int(u.Len) > inLen {
				t.Fatalf("used length %d beyond the %d writable bytes", u.Len, inLen)
			}
			framed := len(out) >= 7 && inLen >= 11
			if u.Len == 0 {
				if framed {
					t.Fatalf("no answer in a chain of %d writable bytes for %x", inLen, out)
				}
				continue
			}
			rep := parse(t, u)
			if len(out) >= 7 {
				reqTag := binary.LittleEndian.Uint16(out[5:])
				if rep.tag != reqTag {
					t.Fatalf("answer tag %#x for request tag %#x (%x)", rep.tag, reqTag, out)
				}
				if rep.typ != tRlerror && rep.typ != out[4]+1 {
					t.Fatalf("answer type %d for request type %d", rep.typ, out[4])
				}
			}
		}
		if err := r.h.FailErr(); err != nil {
			t.Fatalf("device failed with one request at a time: %v", err)
		}
	})
}

// fuzzConcurrent publishes up to 10 chains at once and waits for each to
// come back, or for the device to fail (an undecodable message among
// several in flight is allowed to fail it): never a hang or a panic, and
// never an answer beyond a chain's writable part or under another tag.
func fuzzConcurrent(t *testing.T, data []byte) {
	r := newRaw(t, staticTree(t))
	type sent struct {
		out []byte
		in  int
	}
	chains := map[uint16]sent{}
	for n := 0; len(data) >= 5 && n < 10; n++ {
		inLen := min(int(binary.LittleEndian.Uint16(data)), 16<<10)
		outLen := min(int(binary.LittleEndian.Uint16(data[3:])), len(data)-5)
		out := data[5 : 5+outLen]
		data = data[5+outLen:]
		var bufs [][]byte
		if len(out) > 0 {
			bufs = [][]byte{out}
		}
		var ins []int
		if inLen > 0 {
			ins = []int{inLen}
		}
		if len(bufs)+len(ins) == 0 {
			continue
		}
		head, err := r.h.Queues[0].Add(bufs, ins...)
		if err != nil {
			break
		}
		chains[head] = sent{out, inLen}
	}
	r.h.Kick(0)
	for range chains {
		u, err := r.h.WaitUsedContext(t.Context(), 0)
		if err != nil {
			if r.h.FailErr() == nil {
				t.Fatalf("waiting for %d chains: %v", len(chains), err)
			}
			return
		}
		c := chains[u.Head]
		if int(u.Len) > c.in {
			t.Fatalf("used length %d beyond the %d writable bytes", u.Len, c.in)
		}
		if u.Len == 0 {
			continue
		}
		rep := parse(t, u)
		if len(c.out) >= 7 {
			if reqTag := binary.LittleEndian.Uint16(c.out[5:]); rep.tag != reqTag {
				t.Fatalf("answer tag %#x on the chain of request tag %#x", rep.tag, reqTag)
			}
		}
	}
}
