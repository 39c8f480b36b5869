package main

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/snapmeta/storage/etcdtest"
)

// TestEtcdTLS: --cacert, --cert and --key reach an etcd that serves TLS only
// and requires client certificates.
func TestEtcdTLS(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.WithTLS())
	addr, ms := etcdStore(t, c, "secure")
	fixture(t, ms)
	addr = strings.Replace(addr, "https://", "", -1)

	dir := t.TempDir()
	cert := c.ClientCert(etcdtest.RootUser)
	certFile, keyFile := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem")
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600); err != nil {
		t.Fatal(err)
	}

	want := mask(ok(t, "ls", "--store", boltFixture(t)))
	tlsFlags := []string{"--cacert", c.CAFile(), "--cert", certFile, "--key", keyFile}
	if got := mask(ok(t, append([]string{"ls", "--store", addr}, tlsFlags...)...)); got != want {
		t.Errorf("ls over TLS:\n%s", got)
	}
	if got := ok(t, append([]string{"check", "--store", addr}, tlsFlags...)...); got != "ok: 7 snapshots, no problems\n" {
		t.Errorf("check over TLS: %q", got)
	}
	// Without TLS, or without a client certificate, the server refuses.
	r := exe(t, "ls", "--store", addr, "--dial-timeout", "1s")
	wantFail(t, r, 1, "did not answer within 1s (the server speaks TLS: give --cacert")
	r = exe(t, "ls", "--store", addr, "--dial-timeout", "1s", "--cacert", c.CAFile())
	wantFail(t, r, 1, "did not answer within 1s (TLS: remote error: tls: certificate required)")
}
