package sandbox

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/gosandbox/sandbox/internal/kvmhost"
)

// firstByteWriter records when the first output byte arrives.
type firstByteWriter struct {
	at time.Time
}

func (f *firstByteWriter) Write(p []byte) (int, error) {
	if f.at.IsZero() && len(p) > 0 {
		f.at = time.Now()
	}
	return len(p), nil
}

// BenchmarkSandbox measures, with real KVM (inside the emulated KVM host
// where this host has none):
//
//   - NewToFirstOutput: New → the first byte of `echo hi`'s output, with the
//     boot phases and VM exits per boot;
//   - RunTrue: a Run("true") round trip on a warm sandbox;
//   - Stdout: stdout throughput of `yes | head -c 64M` in MB/s.
func BenchmarkSandbox(b *testing.B) {
	if kvmhost.Delegate(b, kvmhost.WithTimeout(60*time.Minute)) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	b.Run("NewToFirstOutput", func(b *testing.B) {
		var first, init, agent time.Duration
		for i := 0; i < b.N; i++ {
			start := time.Now()
			sb, err := New(ctx)
			if err != nil {
				b.Fatal(err)
			}
			fb := &firstByteWriter{}
			p, err := sb.Exec(ctx, Cmd{Args: []string{"echo", "hi"}, Stdout: fb})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := p.Wait(ctx); err != nil {
				b.Fatal(err)
			}
			first += fb.at.Sub(start)
			b.Logf("boot %d: first output after %v; %s", i, fb.at.Sub(start), sb.Phases())
			ph := sb.Phases()
			init += ph.ToInit()
			agent += ph.ToAgentConnected()
			b.StopTimer()
			sb.Close()
			b.StartTimer()
		}
		b.ReportMetric(first.Seconds()/float64(b.N), "s-to-first-output")
		b.ReportMetric(init.Seconds()/float64(b.N), "s-to-init")
		b.ReportMetric(agent.Seconds()/float64(b.N), "s-to-agent")
	})
	sb, err := New(ctx, CPUs(2))
	if err != nil {
		b.Fatal(err)
	}
	defer sb.Close()
	b.Logf("%s: %s", sb, sb.Phases())
	b.Run("RunTrue", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if res, err := sb.Run(ctx, "true"); err != nil || res.ExitCode != 0 {
				b.Fatal(res, err)
			}
		}
	})
	b.Run("Stdout", func(b *testing.B) {
		const n = 64 << 20
		b.SetBytes(n)
		for i := 0; i < b.N; i++ {
			p, err := sb.Exec(ctx, Cmd{Args: []string{"sh", "-c", "yes 0123456789abcdef | head -c 67108864"}, Stdout: io.Discard})
			if err != nil {
				b.Fatal(err)
			}
			if st, err := p.Wait(ctx); err != nil || !st.Success() {
				b.Fatal(st, err)
			}
		}
	})
}
