package agent

import (
	"slices"
	"testing"
)

const testPasswd = `root:x:0:0:root:/root:/bin/sh
# comment
bad line
app:x:1000:1001:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
`

const testGroup = `root:x:0:
app:x:1001:
staff:x:50:app,other
audio:x:29:other
`

func TestResolveUser(t *testing.T) {
	for _, tc := range []struct {
		spec     string
		uid, gid uint32
		groups   []uint32
		home     string
	}{
		{"root", 0, 0, nil, "/root"},
		{"app", 1000, 1001, []uint32{50}, "/home/app"},
		{"1000", 1000, 1001, []uint32{50}, "/home/app"},
		{"4242", 4242, 0, nil, ""},
		{"4242:7", 4242, 7, nil, ""},
		{"app:staff", 1000, 50, nil, "/home/app"},
		{"nobody:audio", 65534, 29, nil, "/nonexistent"},
	} {
		u, err := resolveUser(tc.spec, []byte(testPasswd), []byte(testGroup))
		if err != nil {
			t.Errorf("%q: %v", tc.spec, err)
			continue
		}
		if u.uid != tc.uid || u.gid != tc.gid || !slices.Equal(u.groups, tc.groups) || u.home != tc.home {
			t.Errorf("%q = %+v, want uid %d gid %d groups %v home %q", tc.spec, u, tc.uid, tc.gid, tc.groups, tc.home)
		}
	}
	for _, spec := range []string{"", ":", "app:", ":staff", "ghost", "app:ghosts"} {
		if _, err := resolveUser(spec, []byte(testPasswd), []byte(testGroup)); err == nil {
			t.Errorf("%q resolved", spec)
		}
	}
}

func FuzzResolveUser(f *testing.F) {
	f.Add("app:staff", testPasswd, testGroup)
	f.Add("1000", testPasswd, "")
	f.Add("x", "x:x:99999999999:1:::\n", "g:x:1:x,x,x\n")
	f.Fuzz(func(t *testing.T, spec, passwd, group string) {
		resolveUser(spec, []byte(passwd), []byte(group))
	})
}
