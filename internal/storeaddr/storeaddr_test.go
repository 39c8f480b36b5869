package storeaddr

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Address
		wantErr string
	}{
		{in: "/var/lib/x/metadata.db", want: Address{Engine: Bolt, Path: "/var/lib/x/metadata.db"}},
		{in: "rel/metadata.db", want: Address{Engine: Bolt, Path: "rel/metadata.db"}},
		{in: "bolt:///var/lib/x/metadata.db", want: Address{Engine: Bolt, Path: "/var/lib/x/metadata.db"}},
		{in: "bolt://rel/m.db", want: Address{Engine: Bolt, Path: "rel/m.db"}},
		{in: "etcd://h1:2379/root", want: Address{Engine: Etcd, Endpoints: []string{"h1:2379"}, Root: "root"}},
		{in: "etcd://h1:2379,h2:2379/a/b", want: Address{Engine: Etcd, Endpoints: []string{"h1:2379", "h2:2379"}, Root: "a/b"}},
		{in: "", wantErr: "empty store address"},
		{in: "bolt://", wantErr: "has no file path"},
		{in: "etcd:///root", wantErr: "has no etcd endpoint"},
		{in: "etcd://h:2379", wantErr: "has no root"},
		{in: "etcd://h:2379/", wantErr: "has no root"},
		{in: "etcd://h:1,,h:2/r", wantErr: "has an empty endpoint"},
		{in: "ftp://x/y", wantErr: `unknown store address scheme "ftp"`},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := Parse(tc.in)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				var ue *UsageError
				assert.True(t, errors.As(err, &ue), "a bad address is a usage error")
				return
			}
			require.NoError(t, err)
			tc.want.Raw = tc.in
			assert.Equal(t, tc.want, got)
			assert.Equal(t, tc.in, got.String())
		})
	}
}

func TestSameStore(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "m.db")
	for _, tc := range []struct {
		a, b string
		same bool
	}{
		{file, "bolt://" + file, true},
		{file, filepath.Join(dir, ".", "m.db"), true},
		{file, filepath.Join(dir, "other.db"), false},
		{"etcd://h:1/r", "etcd://x:2,h:1/r", true},
		{"etcd://h:1/r", "etcd://h:1/s", false},
		{"etcd://h:1/r", "etcd://x:1/r", false},
		{file, "etcd://h:1/r", false},
	} {
		a, err := Parse(tc.a)
		require.NoError(t, err)
		b, err := Parse(tc.b)
		require.NoError(t, err)
		assert.Equal(t, tc.same, a.SameStore(b), "%s vs %s", tc.a, tc.b)
	}
}

func TestClientConfigFlags(t *testing.T) {
	a, err := Parse("etcd://h:1/r")
	require.NoError(t, err)
	for _, tc := range []struct {
		name    string
		flags   EtcdFlags
		env     string
		wantErr string
		user    string
		pass    string
	}{
		{name: "plain"},
		{name: "user:pass", flags: EtcdFlags{User: "bob:pw"}, user: "bob", pass: "pw"},
		{name: "password from env", flags: EtcdFlags{User: "bob"}, env: "pw2", user: "bob", pass: "pw2"},
		{name: "no password", flags: EtcdFlags{User: "bob"}, wantErr: `no password for etcd user "bob"`},
		{name: "no user name", flags: EtcdFlags{User: ":pw"}, wantErr: "--user needs a user name"},
		{name: "cert without key", flags: EtcdFlags{Cert: "c.pem"}, wantErr: "--cert and --key go together"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("SNAPMETA_PASSWORD", tc.env)
			}
			tc.flags.DialTimeout = time.Second
			cfg, err := tc.flags.ClientConfig(a)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, []string{"h:1"}, cfg.Endpoints)
			assert.Equal(t, time.Second, cfg.DialTimeout)
			assert.Equal(t, tc.user, cfg.Username)
			assert.Equal(t, tc.pass, cfg.Password)
		})
	}
}

// TestOpenBolt: a locked file is reported as such within the lock timeout;
// a read-only open never creates a file.
func TestOpenBolt(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "metadata.db")
	a, err := Parse(path)
	require.NoError(t, err)

	_, err = Open(ctx, a, ReadOnly, &EtcdFlags{})
	assert.ErrorContains(t, err, "does not exist")

	ms, err := Open(ctx, a, ReadWrite, &EtcdFlags{})
	require.NoError(t, err)
	defer ms.Close()

	start := time.Now()
	_, err = Open(ctx, a, ReadWrite, &EtcdFlags{})
	var le *LockedError
	require.True(t, errors.As(err, &le), "got %v", err)
	assert.True(t, errors.Is(err, storage.ErrLocked))
	assert.Equal(t, path+" is locked by another process; stop it or copy the file", err.Error())
	assert.Less(t, time.Since(start), BoltLockTimeout+5*time.Second)

	dirAddr, err := Parse(dir)
	require.NoError(t, err)
	_, err = Open(ctx, dirAddr, ReadWrite, &EtcdFlags{})
	assert.ErrorContains(t, err, "is a directory, not a bbolt file")
}

func TestOpenEtcdUnreachable(t *testing.T) {
	a, err := Parse("etcd://127.0.0.1:1/x")
	require.NoError(t, err)
	start := time.Now()
	_, err = Open(context.Background(), a, ReadWrite, &EtcdFlags{DialTimeout: 300 * time.Millisecond})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "etcd 127.0.0.1:1 did not answer within 300ms")
	assert.Less(t, time.Since(start), 5*time.Second)
}
