package agent

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// maxDBSize bounds how much of /etc/passwd or /etc/group is read.
const maxDBSize = 4 << 20

// userInfo is a resolved user spec.
type userInfo struct {
	uid, gid uint32
	groups   []uint32 // supplementary groups
	home     string   // "" if unknown
}

// resolveUser resolves a user spec ("name", "uid", "uid:gid",
// "name:group", "uid:group", "name:gid") the way container runtimes do:
// names are looked up in passwd and group (the files' contents; nil when
// missing), a numeric uid that has no passwd entry is used as is with gid
// equal to 0, and the supplementary groups are those listing the user by
// name.
func resolveUser(spec string, passwd, group []byte) (userInfo, error) {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" || hasGroup && groupPart == "" {
		return userInfo{}, fmt.Errorf("user spec %q is not user[:group]", spec)
	}
	var u userInfo
	name := ""
	found := false
	if id, err := strconv.ParseUint(userPart, 10, 32); err == nil {
		u.uid = uint32(id)
		for _, f := range dbEntries(passwd, 7) {
			if f[2] == userPart {
				name, u.home, found = f[0], f[5], true
				u.gid = parseID(f[3])
				break
			}
		}
	} else {
		for _, f := range dbEntries(passwd, 7) {
			if f[0] == userPart {
				id, err := strconv.ParseUint(f[2], 10, 32)
				if err != nil {
					return userInfo{}, fmt.Errorf("user %q has a bad uid %q in /etc/passwd", userPart, f[2])
				}
				u.uid, u.gid, u.home, name, found = uint32(id), parseID(f[3]), f[5], f[0], true
				break
			}
		}
		if !found {
			return userInfo{}, fmt.Errorf("user %q is not in the guest's /etc/passwd", userPart)
		}
	}
	if hasGroup {
		if id, err := strconv.ParseUint(groupPart, 10, 32); err == nil {
			u.gid = uint32(id)
		} else {
			ok := false
			for _, f := range dbEntries(group, 4) {
				if f[0] == groupPart {
					u.gid, ok = parseID(f[2]), true
					break
				}
			}
			if !ok {
				return userInfo{}, fmt.Errorf("group %q is not in the guest's /etc/group", groupPart)
			}
		}
	}
	if name != "" && !hasGroup {
		for _, f := range dbEntries(group, 4) {
			for _, m := range strings.Split(f[3], ",") {
				if m == name {
					u.groups = append(u.groups, parseID(f[2]))
					break
				}
			}
		}
	}
	return u, nil
}

func parseID(s string) uint32 {
	id, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0
	}
	return uint32(id)
}

// dbEntries splits a passwd- or group-style file into lines of at least n
// colon-separated fields, skipping comments and malformed lines.
func dbEntries(b []byte, n int) [][]string {
	var out [][]string
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		f := strings.Split(line, ":")
		if len(f) < n {
			continue
		}
		out = append(out, f)
	}
	return out
}

// readDB reads a small system database file; a missing file is empty.
func readDB(path string) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, maxDBSize))
	return b
}
