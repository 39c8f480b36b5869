package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snapmeta/storage/etcdtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMigrateSideCredentials: migrate from a cluster that wants client
// certificates to one that wants a user, each side with its own flags;
// the shared flags still reach both sides.
func TestMigrateSideCredentials(t *testing.T) {
	secure := etcdtest.Start(t, etcdtest.WithTLS())
	srcAddr, ms := etcdStore(t, secure, "secure")
	fixture(t, ms)
	srcAddr = strings.ReplaceAll(srcAddr, "https://", "")
	dir := t.TempDir()
	cert := secure.ClientCert(etcdtest.RootUser)
	certFile, keyFile := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem")
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o600))
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600))

	authed := etcdtest.Start(t)
	var dst []string
	for _, root := range []string{"a", "b", "c"} {
		addr, ms := etcdStore(t, authed, root)
		require.NoError(t, ms.Close())
		dst = append(dst, addr)
	}
	cli := authed.Client(t)
	ctx := context.Background()
	_, err = cli.UserAdd(ctx, "root", "rootpw")
	require.NoError(t, err)
	_, err = cli.RoleAdd(ctx, "root")
	require.NoError(t, err)
	_, err = cli.UserGrantRole(ctx, "root", "root")
	require.NoError(t, err)
	_, err = cli.AuthEnable(ctx)
	require.NoError(t, err)

	fromTLS := []string{"--from-cacert", secure.CAFile(), "--from-cert", certFile, "--from-key", keyFile}
	sharedTLS := []string{"--cacert", secure.CAFile(), "--cert", certFile, "--key", keyFile}
	for _, tc := range []struct {
		name string
		args []string
		env  []string
		dst  string // checked afterwards with --user root:rootpw
	}{
		{"each side its own", append([]string{"--to", dst[0], "--to-user", "root:rootpw"}, fromTLS...), nil, dst[0]},
		{"target password from SNAPMETA_TO_PASSWORD", append([]string{"--to", dst[1], "--to-user", "root"}, fromTLS...), []string{"SNAPMETA_TO_PASSWORD=rootpw", "SNAPMETA_PASSWORD=wrong"}, dst[1]},
		{"shared TLS for the source, own user for the target", append([]string{"--to", dst[2], "--to-user", "root:rootpw", "--dial-timeout", "1s"}, sharedTLS...), nil, ""},
		{"shared TLS reaches a bbolt target unused", append([]string{"--to", filepath.Join(t.TempDir(), "m.db")}, sharedTLS...), nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := snapmeta(t, "", tc.env, append([]string{"migrate", "--from", srcAddr}, tc.args...)...)
			if tc.name == "shared TLS for the source, own user for the target" {
				// The shared TLS flags reach the target too, which does
				// not speak TLS: they apply to both sides.
				wantFail(t, r, 1, "target: ")
				return
			}
			require.Equal(t, 0, r.code, "%s%s", r.stdout, r.stderr)
			assert.Contains(t, r.stdout, "verified: 7 snapshots in each store")
			if tc.dst != "" {
				assert.Equal(t, "ok: 7 snapshots, no problems\n", ok(t, "check", tc.dst, "--user", "root:rootpw"))
			}
		})
	}
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--to", dst[0], "--from-cert", certFile}, nil, "--from-cert and --from-key go together"},
		{[]string{"--to", dst[0], "--to-key", keyFile}, nil, "--to-cert and --to-key go together"},
		{[]string{"--to", dst[0], "--to-user", "root"}, nil, `no password for etcd user "root": set SNAPMETA_TO_PASSWORD or SNAPMETA_PASSWORD`},
	} {
		t.Run(strings.Join(tc.args, "_"), func(t *testing.T) {
			wantFail(t, snapmeta(t, "", tc.env, append([]string{"migrate", "--from", srcAddr}, tc.args...)...), 2, tc.want)
		})
	}
}
