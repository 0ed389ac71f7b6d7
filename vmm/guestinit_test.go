package vmm

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/gosandbox/sandbox/internal/cpio"
)

// initMarker starts the line internal/testinit prints.
const initMarker = "GOSANDBOX-TEST-INIT"

// buildTestInit builds internal/testinit as a static binary into dir.
func buildTestInit(t testing.TB, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "testinit")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./internal/testinit")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build test init: %v\n%s", err, b)
	}
	return out
}

// testInitramfs packs the test init as /init.
func testInitramfs(t testing.TB, initPath string) []byte {
	t.Helper()
	bin, err := os.ReadFile(initPath)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	w := cpio.NewWriter(&buf)
	for _, e := range []cpio.Entry{
		{Name: "dev", Mode: cpio.TypeDir | 0o755},
		{Name: "dev/console", Mode: cpio.TypeChar | 0o600, Major: 5, Minor: 1},
		{Name: "sys", Mode: cpio.TypeDir | 0o755},
		{Name: "init", Mode: cpio.TypeRegular | 0o755, Data: bin},
	} {
		if err := w.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
