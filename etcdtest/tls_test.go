package etcdtest_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage/etcdtest"
)

// refuseWithin bounds how long a refused request may take: the server
// refuses at once, the rest is the client giving up.
const refuseWithin = 5 * time.Second

func TestTLSCertificates(t *testing.T) {
	ca, err := etcdtest.NewCA("test CA")
	require.NoError(t, err)
	caCert := ca.Certificate()
	assert.True(t, caCert.IsCA)
	assert.Equal(t, "test CA", caCert.Subject.CommonName)
	block, rest := pem.Decode(ca.PEM())
	require.NotNil(t, block)
	assert.Empty(t, rest)
	assert.Equal(t, caCert.Raw, block.Bytes)

	now := time.Now()
	check := func(t *testing.T, cert tls.Certificate, usage x509.ExtKeyUsage) *x509.Certificate {
		t.Helper()
		leaf := cert.Leaf
		require.NotNil(t, leaf)
		key, ok := leaf.PublicKey.(*ecdsa.PublicKey)
		require.True(t, ok, "ECDSA key, got %T", leaf.PublicKey)
		assert.Equal(t, elliptic.P256(), key.Curve)
		assert.False(t, leaf.NotBefore.After(now), "valid now")
		assert.True(t, leaf.NotAfter.After(now.Add(etcdtest.CertValidity-time.Minute)))
		assert.False(t, leaf.NotAfter.After(now.Add(etcdtest.CertValidity+time.Minute)), "short validity")
		_, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{usage}})
		assert.NoError(t, err)
		return leaf
	}

	t.Run("client", func(t *testing.T) {
		cert, err := ca.ClientCert("alice")
		require.NoError(t, err)
		leaf := check(t, cert, x509.ExtKeyUsageClientAuth)
		assert.Equal(t, "alice", leaf.Subject.CommonName)
		_, err = leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		assert.Error(t, err, "a client certificate is no server certificate")
	})
	t.Run("server", func(t *testing.T) {
		cert, err := ca.ServerCert("127.0.0.1", "localhost")
		require.NoError(t, err)
		leaf := check(t, cert, x509.ExtKeyUsageServerAuth)
		assert.NoError(t, leaf.VerifyHostname("127.0.0.1"))
		assert.NoError(t, leaf.VerifyHostname("localhost"))
		assert.Error(t, leaf.VerifyHostname("example.com"))
		_, err = ca.ServerCert()
		assert.Error(t, err, "no host")
	})
	t.Run("other CA", func(t *testing.T) {
		other, err := etcdtest.NewCA("other CA")
		require.NoError(t, err)
		cert, err := other.ClientCert("alice")
		require.NoError(t, err)
		_, err = cert.Leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		assert.Error(t, err)
	})
}

func TestTLSWithoutTLSOption(t *testing.T) {
	c := etcdtest.Start(t)
	assert.Nil(t, c.CA())
	assert.Nil(t, c.Authority())
	assert.Empty(t, c.CAFile())
	assert.Nil(t, c.ClientConfig().TLS)
	assert.Panics(t, func() { c.ClientCert("alice") })
	assert.Panics(t, func() { c.ClientTLS("alice") })
	assert.Panics(t, func() { c.ClientConfigAs("alice") })
}

func TestTLSServesHTTPSOnly(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.WithTLS())
	ep := c.Endpoint(0)
	require.True(t, strings.HasPrefix(ep, "https://127.0.0.1:"), ep)
	assert.Equal(t, []string{ep}, c.Endpoints())
	require.NotNil(t, c.ClientConfig().TLS)

	cli := c.Client(t)
	put(t, cli, "k", "v")
	assert.Equal(t, "v", get(t, c.MemberClient(t, 0), "k"))

	// The server presents a certificate for 127.0.0.1 and localhost signed
	// by the cluster's CA, and asks for a client certificate from it.
	host := strings.TrimPrefix(ep, "https://")
	for _, name := range []string{"127.0.0.1", "localhost"} {
		conn, err := tls.Dial("tcp", host, &tls.Config{
			RootCAs:      c.CA(),
			ServerName:   name,
			Certificates: []tls.Certificate{c.ClientCert("probe")},
			MinVersion:   tls.VersionTLS12,
		})
		require.NoError(t, err, "server name %s", name)
		state := conn.ConnectionState()
		assert.Equal(t, c.Authority().Certificate().Raw, state.VerifiedChains[0][len(state.VerifiedChains[0])-1].Raw)
		require.NoError(t, conn.Close())
	}

	// The CA file is etcd's trusted CA and holds the same certificate.
	pemBytes, err := os.ReadFile(c.CAFile())
	require.NoError(t, err)
	assert.Equal(t, c.Authority().PEM(), pemBytes)
	assert.Equal(t, c.CAFile(), c.Member(0).Config().ClientTLSInfo.TrustedCAFile)
	assert.True(t, c.Member(0).Config().ClientTLSInfo.ClientCertAuth)

	// Plain HTTP/2 without TLS gets nowhere.
	cfg := c.ClientConfig()
	cfg.TLS = nil
	cfg.Endpoints = []string{strings.Replace(ep, "https://", "http://", 1)}
	assertRefused(t, cfg)
}

// assertRefused checks that a client made with cfg cannot read: either
// clientv3.New or the first request fails, and within refuseWithin.
func assertRefused(t *testing.T, cfg clientv3.Config) error {
	t.Helper()
	start := time.Now()
	cli, err := clientv3.New(cfg)
	if err == nil {
		defer cli.Close()
		// etcd's client waits for a usable connection until the deadline.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err = cli.Get(ctx, "k")
		cancel()
	}
	took := time.Since(start)
	require.Error(t, err, "refused")
	assert.Less(t, took, refuseWithin, "refused in time")
	t.Logf("refused after %v: %v", took.Round(time.Millisecond), err)
	return err
}

func TestTLSRefusesClientsWithoutValidCertificate(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.WithTLS())
	other, err := etcdtest.NewCA("other CA")
	require.NoError(t, err)
	foreign, err := other.ClientCert(etcdtest.RootUser)
	require.NoError(t, err)
	serverCert, err := other.ServerCert("127.0.0.1")
	require.NoError(t, err)

	for _, tc := range []struct {
		name string
		tls  *tls.Config
	}{
		{"no certificate", &tls.Config{RootCAs: c.CA(), MinVersion: tls.VersionTLS12}},
		{"certificate from another CA", &tls.Config{RootCAs: c.CA(), Certificates: []tls.Certificate{foreign}, MinVersion: tls.VersionTLS12}},
		{"server certificate from another CA", &tls.Config{RootCAs: c.CA(), Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS12}},
		{"server not trusted", &tls.Config{RootCAs: other.Pool(), Certificates: []tls.Certificate{c.ClientCert(etcdtest.RootUser)}, MinVersion: tls.VersionTLS12}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each waits for its request's deadline
			cfg := c.ClientConfig()
			cfg.TLS = tc.tls
			assertRefused(t, cfg)
		})
	}
}

func TestTLSClientCertAuthRBAC(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.WithTLS(), etcdtest.WithAuth("root-secret"))
	root := c.Client(t)
	ctx := ctxTimeout(t, opTimeout)
	status, err := root.AuthStatus(ctx)
	require.NoError(t, err)
	require.True(t, status.Enabled, "auth enabled")

	// alice may read and write below alice/ only; she has no password.
	_, err = root.UserAddWithOptions(ctx, "alice", "", &clientv3.UserAddOptions{NoPassword: true})
	require.NoError(t, err)
	_, err = root.RoleAdd(ctx, "alice-rw")
	require.NoError(t, err)
	_, err = root.RoleGrantPermission(ctx, "alice-rw", "alice/", clientv3.GetPrefixRangeEnd("alice/"), clientv3.PermissionType(clientv3.PermReadWrite))
	require.NoError(t, err)
	_, err = root.UserGrantRole(ctx, "alice", "alice-rw")
	require.NoError(t, err)
	put(t, root, "bob/k", "bob's")

	alice := newClient(t, c.ClientConfigAs("alice"))
	put(t, alice, "alice/k", "v")
	assert.Equal(t, "v", get(t, alice, "alice/k"))
	for name, op := range map[string]func(ctx context.Context) error{
		"get":        func(ctx context.Context) error { _, err := alice.Get(ctx, "bob/k"); return err },
		"put":        func(ctx context.Context) error { _, err := alice.Put(ctx, "bob/k", "x"); return err },
		"delete":     func(ctx context.Context) error { _, err := alice.Delete(ctx, "bob/k"); return err },
		"get prefix": func(ctx context.Context) error { _, err := alice.Get(ctx, "alice", clientv3.WithPrefix()); return err },
		"user list":  func(ctx context.Context) error { _, err := alice.UserList(ctx); return err },
	} {
		err := op(ctxTimeout(t, opTimeout))
		assert.ErrorIs(t, err, rpctypes.ErrPermissionDenied, name)
	}
	assert.Equal(t, "bob's", get(t, root, "bob/k"))

	// A certificate for a user that does not exist reads nothing.
	mallory := newClient(t, c.ClientConfigAs("mallory"))
	_, err = mallory.Get(ctxTimeout(t, opTimeout), "alice/k")
	assert.ErrorIs(t, err, rpctypes.ErrPermissionDenied)

	// A password login takes precedence over the certificate's CN.
	_, err = root.UserAdd(ctx, "carol", "carol-secret")
	require.NoError(t, err)
	_, err = root.UserGrantRole(ctx, "carol", "alice-rw")
	require.NoError(t, err)
	cfg := c.ClientConfigAs("mallory")
	cfg.Username, cfg.Password = "carol", "carol-secret"
	carol := newClient(t, cfg)
	assert.Equal(t, "v", get(t, carol, "alice/k"))
	cfg.Password = "wrong"
	_, err = clientv3.New(cfg)
	assert.ErrorIs(t, err, rpctypes.ErrAuthFailed)
}

func TestTLSAuthWithPasswordOnly(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.WithAuth("root-secret"))
	cfg := c.ClientConfig()
	assert.Nil(t, cfg.TLS)
	assert.Equal(t, etcdtest.RootUser, cfg.Username)
	assert.Equal(t, "root-secret", cfg.Password)
	root := c.Client(t)
	put(t, root, "k", "v")

	cfg.Username, cfg.Password = "", ""
	anonymous := newClient(t, cfg)
	_, err := anonymous.Get(ctxTimeout(t, opTimeout), "k")
	assert.ErrorIs(t, err, rpctypes.ErrUserEmpty)

	cfg.Username, cfg.Password = etcdtest.RootUser, "wrong"
	_, err = clientv3.New(cfg)
	assert.ErrorIs(t, err, rpctypes.ErrAuthFailed)

	_, err = etcdtest.New(etcdtest.WithAuth(""))
	assert.Error(t, err, "a root without password needs TLS")
}

func TestTLSAuthClusterSurvivesRestart(t *testing.T) {
	c := etcdtest.StartCluster(t, 3, etcdtest.WithTLS(), etcdtest.WithAuth(""))
	for _, ep := range c.Endpoints() {
		assert.True(t, strings.HasPrefix(ep, "https://"), ep)
	}
	put(t, c.Client(t), "k", "v1")

	c.Stop(1)
	put(t, c.Client(t), "k", "v2")
	require.NoError(t, c.Restart(1))
	m := c.MemberClient(t, 1)
	require.Eventually(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		resp, err := m.Get(ctx, "k")
		return err == nil && len(resp.Kvs) == 1 && string(resp.Kvs[0].Value) == "v2"
	}, opTimeout, 20*time.Millisecond)
	status, err := m.AuthStatus(ctxTimeout(t, opTimeout))
	require.NoError(t, err)
	assert.True(t, status.Enabled, "auth survives a restart")

	// root has no password: only its certificate logs in. (etcd refuses a
	// password for such a user with codes.Unknown, not ErrAuthFailed.)
	cfg := c.ClientConfig()
	cfg.TLS = c.ClientTLS("nobody")
	cfg.Username, cfg.Password = etcdtest.RootUser, "anything"
	_, err = clientv3.New(cfg)
	assert.ErrorContains(t, err, "authentication failed")
}

func newClient(t *testing.T, cfg clientv3.Config) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}
