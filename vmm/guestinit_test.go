package vmm

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gosandbox/sandbox/internal/cpio"
)

// The test binary doubles as the init of the Linux guests it boots: when it
// runs as PID 1 it reports on the console and powers the VM off.

// initMarker prefixes the line the guest init prints.
const initMarker = "GOSANDBOX-TEST-INIT"

func TestMain(m *testing.M) {
	if os.Getpid() == 1 {
		guestInit()
	}
	os.Exit(m.Run())
}

// guestInit is PID 1 inside a test guest. It never returns.
func guestInit() {
	writePort := func(v byte) {
		if f, err := os.OpenFile("/dev/port", os.O_WRONLY, 0); err == nil {
			f.WriteAt([]byte{v}, BootPort)
			f.Close()
		}
	}
	os.MkdirAll("/dev", 0o755)
	unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	writePort(PhaseInitStarted)
	os.MkdirAll("/sys", 0o755)
	os.MkdirAll("/proc", 0o755)
	unix.Mount("sysfs", "/sys", "sysfs", 0, "")
	unix.Mount("proc", "/proc", "proc", 0, "")
	online, err := os.ReadFile("/sys/devices/system/cpu/online")
	if err != nil {
		online = []byte("error:" + err.Error())
	}
	var uts unix.Utsname
	unix.Uname(&uts)
	con, err := os.OpenFile("/dev/console", os.O_WRONLY, 0)
	if err != nil {
		con = os.Stdout
	}
	fmt.Fprintf(con, "\n%s cpus=%s kernel=%s\n", initMarker, strings.TrimSpace(string(online)), bytes.TrimRight(uts.Release[:], "\x00"))
	if os.Getenv("GOSANDBOX_TEST_PANIC") == "1" {
		// Crash the kernel: PID 1 exiting panics it.
		os.Exit(3)
	}
	writePort(PhasePoweroff)
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {}
}

// testInitramfs packs this test binary as /init.
func testInitramfs(t testing.TB) []byte {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	w := cpio.NewWriter(&buf)
	for _, e := range []cpio.Entry{
		{Name: "dev", Mode: cpio.TypeDir | 0o755},
		{Name: "dev/console", Mode: cpio.TypeChar | 0o600, Major: 5, Minor: 1},
		{Name: "proc", Mode: cpio.TypeDir | 0o755},
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
