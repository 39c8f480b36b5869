package etcdtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
)

// Security: TLS, client certificates and authentication.
//
//	c := etcdtest.Start(t, etcdtest.WithTLS(), etcdtest.WithAuth("secret"))
//	root := c.Client(t)                      // CN "root": etcd's root user
//	cfg := c.ClientConfigAs("alice")         // CN "alice": the user alice
//	cfg.TLS = c.ClientTLS("alice")           // the same, by hand
//
// With WithTLS every member serves clients over TLS only (https client
// URLs), with a server certificate for 127.0.0.1, ::1 and localhost signed by
// a certificate authority made for the cluster, and requires every client to
// present a certificate signed by that authority (etcd's --client-cert-auth).
// Peers keep talking plain HTTP among themselves.
//
// With WithAuth, etcd's authentication is enabled once the cluster is up: a
// user "root" with the given password and the role "root" exist, and every
// request must carry a user. etcd takes the user from the auth token when
// the client has one (clientv3.Config Username and Password), else, with
// client certificate authentication, from the common name (CN) of the
// client's certificate; the user must exist, and its roles decide what it
// may read and write (see clientv3.Auth). A certificate whose CN names no
// user gets PermissionDenied for every key.
//
// Certificates use ECDSA P-256 keys and are valid from a minute ago for
// CertValidity. The authority's private key lives in memory only; the files
// etcd needs (CA, server certificate and key) are written to the cluster's
// temporary directory and removed by Close.

// CertValidity is how long certificates made by this package stay valid.
const CertValidity = 24 * time.Hour

// minBcryptCost is bcrypt.MinCost, the lowest cost etcd accepts.
const minBcryptCost = 4

// RootUser is the name of etcd's root user, which WithAuth creates, and the
// CN of the certificate in the configuration returned by ClientConfig when
// the cluster uses TLS.
const RootUser = "root"

// security is what WithTLS and WithAuth ask for.
type security struct {
	tls          bool
	auth         bool
	rootPassword string

	// Made by prepare, shared by the attempts of NewCluster and by Restart.
	ca         *CA
	serverCert tls.Certificate
}

// WithTLS serves clients over TLS only and requires client certificates
// signed by the cluster's own certificate authority (etcd's --cert-file,
// --key-file, --trusted-ca-file and --client-cert-auth). The client URLs
// (Endpoint, Endpoints) become https://127.0.0.1:port. ClientConfig, Client
// and MemberClient then carry a certificate with CN RootUser; use
// ClientConfigAs, ClientTLS or ClientCert for other identities, and CA or
// CAFile to trust the server.
func WithTLS() Option {
	return func(s *settings) { s.security.tls = true }
}

// WithAuth enables etcd's authentication once the cluster has started: it
// creates the user RootUser with rootPassword and the role "root", grants
// the role to the user and enables auth. The auth state is stored in etcd
// and survives Stop and Restart.
//
// ClientConfig, Client and MemberClient keep working as root: with WithTLS
// through the certificate with CN RootUser (and rootPassword may be empty,
// making a root without a password that only a certificate can log in as);
// without WithTLS through Username RootUser and Password rootPassword, which
// must then not be empty.
//
// Password hashing uses bcrypt's minimum cost (etcd's --bcrypt-cost), to keep
// tests fast; the cost is set for every cluster, with or without WithAuth.
func WithAuth(rootPassword string) Option {
	return func(s *settings) {
		s.security.auth = true
		s.security.rootPassword = rootPassword
	}
}

// prepare makes the certificate authority and the server certificate.
func (sec *security) prepare() error {
	if sec.auth && !sec.tls && sec.rootPassword == "" {
		return errors.New("WithAuth with an empty root password needs WithTLS: nobody could log in as root")
	}
	if !sec.tls || sec.ca != nil {
		return nil
	}
	ca, err := NewCA("etcdtest CA")
	if err != nil {
		return err
	}
	cert, err := ca.ServerCert("127.0.0.1", "::1", "localhost")
	if err != nil {
		return err
	}
	sec.ca, sec.serverCert = ca, cert
	return nil
}

// tlsDir holds the files etcd reads.
func (c *Cluster) tlsDir() string { return filepath.Join(c.dir, "tls") }

// writeTLSFiles writes the CA and server certificate and key for etcd.
func (c *Cluster) writeTLSFiles() error {
	sec := &c.settings.security
	if !sec.tls {
		return nil
	}
	dir := c.tlsDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	certPEM, keyPEM, err := encodeCert(sec.serverCert)
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{"ca.crt": sec.ca.PEM(), "server.crt": certPEM, "server.key": keyPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// clientScheme is the scheme of the client URLs.
func (s *settings) clientScheme() string {
	if s.security.tls {
		return "https"
	}
	return "http"
}

// configureSecurity fills in the TLS settings of a member's configuration.
func (c *Cluster) configureSecurity(cfg *embed.Config) {
	cfg.BcryptCost = minBcryptCost
	if !c.settings.security.tls {
		return
	}
	dir := c.tlsDir()
	cfg.ClientTLSInfo.CertFile = filepath.Join(dir, "server.crt")
	cfg.ClientTLSInfo.KeyFile = filepath.Join(dir, "server.key")
	cfg.ClientTLSInfo.TrustedCAFile = filepath.Join(dir, "ca.crt")
	cfg.ClientTLSInfo.ClientCertAuth = true
}

// addCredentials makes cfg, a client configuration for the cluster, log in
// as root when the cluster uses TLS or auth.
func (c *Cluster) addCredentials(cfg *clientv3.Config) {
	sec := &c.settings.security
	switch {
	case sec.tls:
		cfg.TLS = c.ClientTLS(RootUser)
	case sec.auth:
		cfg.Username = RootUser
		cfg.Password = sec.rootPassword
	}
}

// enableAuth creates root and enables authentication, when WithAuth asked
// for it.
func (c *Cluster) enableAuth() error {
	sec := &c.settings.security
	if !sec.auth {
		return nil
	}
	cfg := c.ClientConfig()
	// Auth is not enabled yet: no token to fetch.
	cfg.Username, cfg.Password = "", ""
	cli, err := clientv3.New(cfg)
	if err != nil {
		return fmt.Errorf("enabling auth: %w", err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.settings.startTimeout)
	defer cancel()
	opts := &clientv3.UserAddOptions{NoPassword: sec.rootPassword == ""}
	if _, err := cli.UserAddWithOptions(ctx, RootUser, sec.rootPassword, opts); err != nil {
		return fmt.Errorf("enabling auth: adding user %s: %w", RootUser, err)
	}
	if _, err := cli.RoleAdd(ctx, RootUser); err != nil && !errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
		return fmt.Errorf("enabling auth: adding role %s: %w", RootUser, err)
	}
	if _, err := cli.UserGrantRole(ctx, RootUser, RootUser); err != nil {
		return fmt.Errorf("enabling auth: granting role %s: %w", RootUser, err)
	}
	if _, err := cli.AuthEnable(ctx); err != nil {
		return fmt.Errorf("enabling auth: %w", err)
	}
	return nil
}

// mustTLS panics unless the cluster was made with WithTLS.
func (c *Cluster) mustTLS(method string) *security {
	sec := &c.settings.security
	if !sec.tls {
		panic("etcdtest: " + method + " needs a cluster made with WithTLS")
	}
	return sec
}

// Authority returns the cluster's certificate authority, which signed the
// server certificate and signs client certificates, or nil without WithTLS.
func (c *Cluster) Authority() *CA {
	return c.settings.security.ca
}

// CA returns a new pool holding the cluster's CA certificate, for
// tls.Config.RootCAs (to trust the servers) or ClientCAs, or nil without
// WithTLS.
func (c *Cluster) CA() *x509.CertPool {
	if !c.settings.security.tls {
		return nil
	}
	return c.settings.security.ca.Pool()
}

// CAFile returns the path of the cluster's CA certificate (PEM), which etcd
// uses as --trusted-ca-file, or "" without WithTLS. The file is removed by
// Close. The server's own certificate and key are next to it, in
// server.crt and server.key.
func (c *Cluster) CAFile() string {
	if !c.settings.security.tls {
		return ""
	}
	return filepath.Join(c.tlsDir(), "ca.crt")
}

// ClientCert returns a new client certificate with the given common name,
// signed by the cluster's CA. With client certificate authentication etcd
// takes the CN as the user name. It panics without WithTLS.
func (c *Cluster) ClientCert(commonName string) tls.Certificate {
	sec := c.mustTLS("ClientCert")
	cert, err := sec.ca.ClientCert(commonName)
	if err != nil {
		panic(fmt.Sprintf("etcdtest: %v", err))
	}
	return cert
}

// ClientTLS returns a TLS configuration that trusts the cluster's servers
// and presents a new certificate with CN user (see ClientCert). It panics
// without WithTLS.
func (c *Cluster) ClientTLS(user string) *tls.Config {
	c.mustTLS("ClientTLS")
	return &tls.Config{
		RootCAs:      c.CA(),
		Certificates: []tls.Certificate{c.ClientCert(user)},
		MinVersion:   tls.VersionTLS12,
	}
}

// ClientConfigAs returns ClientConfig with the certificate of user instead
// of root's (see ClientTLS). It panics without WithTLS.
func (c *Cluster) ClientConfigAs(user string) clientv3.Config {
	c.mustTLS("ClientConfigAs")
	cfg := c.ClientConfig()
	cfg.TLS = c.ClientTLS(user)
	return cfg
}

// CA is a throwaway certificate authority for tests: an ECDSA P-256 key
// that lives in memory only and a self-signed certificate valid for
// CertValidity. Its methods are safe for concurrent use.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

// NewCA makes a new certificate authority with the given common name.
func NewCA(commonName string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("etcdtest: CA key: %w", err)
	}
	tmpl, err := template(commonName)
	if err != nil {
		return nil, err
	}
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.MaxPathLenZero = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("etcdtest: CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("etcdtest: CA certificate: %w", err)
	}
	return &CA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// Certificate returns the CA's certificate. The caller must not modify it.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// PEM returns the CA's certificate in PEM form.
func (ca *CA) PEM() []byte { return append([]byte(nil), ca.pem...) }

// Pool returns a new pool holding the CA's certificate.
func (ca *CA) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	return pool
}

// ClientCert returns a new certificate for TLS client authentication with
// the given common name (etcd's user name), signed by the CA.
func (ca *CA) ClientCert(commonName string) (tls.Certificate, error) {
	return ca.issue(commonName, nil, x509.ExtKeyUsageClientAuth)
}

// ServerCert returns a new certificate for TLS servers (and clients) with
// the given hosts, IP addresses or DNS names, as subject alternative names,
// signed by the CA. Its common name is the first host.
func (ca *CA) ServerCert(hosts ...string) (tls.Certificate, error) {
	if len(hosts) == 0 {
		return tls.Certificate{}, errors.New("etcdtest: a server certificate needs at least one host")
	}
	return ca.issue(hosts[0], hosts, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
}

func (ca *CA) issue(commonName string, hosts []string, usage ...x509.ExtKeyUsage) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("etcdtest: certificate key: %w", err)
	}
	tmpl, err := template(commonName)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = usage
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("etcdtest: certificate for %q: %w", commonName, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("etcdtest: certificate for %q: %w", commonName, err)
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// template is the part of a certificate common to all made here.
func template(commonName string) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("etcdtest: serial number: %w", err)
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: commonName, Organization: []string{"etcdtest"}},
		NotBefore:    now.Add(-time.Minute), // tolerate a little clock skew
		NotAfter:     now.Add(CertValidity),
	}, nil
}

// encodeCert returns the PEM forms of cert's chain and private key.
func encodeCert(cert tls.Certificate) (certPEM, keyPEM []byte, err error) {
	for _, der := range cert.Certificate {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return nil, nil, fmt.Errorf("etcdtest: encoding key: %w", err)
	}
	return certPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}
