package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/snapmeta/storage"
	bolt "go.etcd.io/bbolt"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Store addresses, one syntax for every command:
//
//	bolt:///var/lib/x/metadata.db    a bbolt file (absolute path)
//	bolt://rel/metadata.db           a bbolt file (relative path)
//	/var/lib/x/metadata.db           a bare path is a bbolt file too
//	etcd://h1:2379,h2:2379/root      etcd endpoints and the store's root
const addressHelp = `Store addresses:
  bolt:///path/to/metadata.db        a bbolt file (a bare path means the same)
  etcd://host:2379[,host:2379]/ROOT  an etcd cluster and the store's root key;
                                     TLS with --cacert/--cert/--key, auth with
                                     --user (password from SNAPMETA_PASSWORD
                                     or --user name:pass)`

// boltLockTimeout is how long a command waits for another process to
// release a bbolt file before it reports the file as locked.
const boltLockTimeout = time.Second

// address is a parsed store address.
type address struct {
	raw string
	// engine is "bolt" or "etcd".
	engine string
	// path is the bbolt file.
	path string
	// endpoints and root are the etcd cluster and key prefix.
	endpoints []string
	root      string
}

func (a address) String() string { return a.raw }

// sameStore reports whether a and b name the same store (used to refuse a
// migration onto its own source).
func (a address) sameStore(b address) bool {
	if a.engine != b.engine {
		return false
	}
	if a.engine == "bolt" {
		pa, errA := filepath.Abs(a.path)
		pb, errB := filepath.Abs(b.path)
		if errA != nil || errB != nil {
			return a.path == b.path
		}
		if pa == pb {
			return true
		}
		sa, errA := os.Stat(pa)
		sb, errB := os.Stat(pb)
		return errA == nil && errB == nil && os.SameFile(sa, sb)
	}
	if a.root != b.root {
		return false
	}
	for _, ea := range a.endpoints {
		for _, eb := range b.endpoints {
			if ea == eb {
				return true
			}
		}
	}
	return false
}

// parseAddress parses a store address (see addressHelp).
func parseAddress(s string) (address, error) {
	a := address{raw: s}
	switch {
	case s == "":
		return a, usageErrorf("empty store address")
	case strings.HasPrefix(s, "bolt://"):
		a.engine, a.path = "bolt", strings.TrimPrefix(s, "bolt://")
		if a.path == "" {
			return a, usageErrorf("store address %q has no file path (want bolt:///path/to/metadata.db)", s)
		}
	case strings.HasPrefix(s, "etcd://"):
		rest := strings.TrimPrefix(s, "etcd://")
		hosts, root, _ := strings.Cut(rest, "/")
		if hosts == "" {
			return a, usageErrorf("store address %q has no etcd endpoint (want etcd://host:2379/ROOT)", s)
		}
		if root == "" {
			return a, usageErrorf("store address %q has no root (want etcd://host:2379/ROOT)", s)
		}
		for _, h := range strings.Split(hosts, ",") {
			if h == "" {
				return a, usageErrorf("store address %q has an empty endpoint", s)
			}
			// gRPC would try port 443 until the dial timeout.
			if _, port, err := net.SplitHostPort(h); err != nil || port == "" {
				return a, usageErrorf("etcd endpoint %q of store address %q has no port (want host:2379)", h, s)
			}
			a.endpoints = append(a.endpoints, h)
		}
		a.engine, a.root = "etcd", root
	case strings.Contains(s, "://"):
		scheme, _, _ := strings.Cut(s, "://")
		return a, usageErrorf("unknown store address scheme %q in %q (want bolt:// or etcd://)", scheme, s)
	default:
		a.engine, a.path = "bolt", s
	}
	return a, nil
}

// etcdFlags are the connection settings shared by every etcd address.
type etcdFlags struct {
	cacert      string
	cert        string
	key         string
	user        string
	dialTimeout time.Duration
}

// clientConfig builds the etcd client configuration for a.
func (f *etcdFlags) clientConfig(a address) (*clientv3.Config, error) {
	cfg := &clientv3.Config{
		Endpoints:   a.endpoints,
		DialTimeout: f.dialTimeout,
		Logger:      zap.NewNop(),
	}
	if f.cacert != "" || f.cert != "" || f.key != "" {
		if (f.cert == "") != (f.key == "") {
			return nil, usageErrorf("--cert and --key go together")
		}
		info := transport.TLSInfo{CertFile: f.cert, KeyFile: f.key, TrustedCAFile: f.cacert}
		tlsCfg, err := info.ClientConfig()
		if err != nil {
			// The files named on the command line are missing or wrong.
			return nil, usageErrorf("TLS settings: %v", err)
		}
		cfg.TLS = tlsCfg
	}
	if f.user != "" {
		name, pass, ok := strings.Cut(f.user, ":")
		if !ok {
			pass, ok = os.LookupEnv("SNAPMETA_PASSWORD")
		}
		if name == "" {
			return nil, usageErrorf("--user needs a user name")
		}
		if !ok {
			return nil, usageErrorf("no password for etcd user %q: set SNAPMETA_PASSWORD or use --user %s:PASSWORD", name, name)
		}
		cfg.Username, cfg.Password = name, pass
	}
	return cfg, nil
}

// openMode says what a command does with a store.
type openMode int

const (
	// readOnly opens a bbolt file read-only (a shared lock: other readers
	// may run, a daemon holding the file blocks it) and never creates it.
	readOnly openMode = iota
	// readWrite opens a bbolt file for writing, creating it if needed.
	readWrite
)

// lockedError reports a bbolt file held by another process.
type lockedError struct {
	path string
	err  error
}

func (e *lockedError) Error() string {
	return fmt.Sprintf("%s is locked by another process; stop it or copy the file", e.path)
}

func (e *lockedError) Unwrap() error { return e.err }

// openStore opens the store at a.
func openStore(ctx context.Context, a address, mode openMode, ef *etcdFlags) (storage.MetaStore, error) {
	switch a.engine {
	case "bolt":
		return openBolt(a.path, mode)
	case "etcd":
		return openEtcd(ctx, a, mode, ef)
	}
	return nil, fmt.Errorf("unknown engine %q", a.engine)
}

func openBolt(path string, mode openMode) (storage.MetaStore, error) {
	st, err := os.Stat(path)
	switch {
	case err == nil && st.IsDir():
		return nil, fmt.Errorf("%s is a directory, not a bbolt file", path)
	case errors.Is(err, os.ErrNotExist) && mode == readOnly:
		return nil, fmt.Errorf("%s does not exist", path)
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return nil, err
	}
	if err == nil && mode == readWrite {
		// Before anything is written into a file of another kind.
		if err := boltLayoutProblem(path); err != nil {
			return nil, err
		}
	}
	ms, err := storage.NewBoltMetaStore(path, func(o *bolt.Options) error {
		o.ReadOnly = mode == readOnly
		o.Timeout = boltLockTimeout
		return nil
	})
	if errors.Is(err, storage.ErrLocked) {
		return nil, &lockedError{path: path, err: err}
	}
	if err == nil && mode == readOnly {
		// Once the store holds the file: a daemon's lock is reported as such.
		if err := boltLayoutProblem(path); err != nil {
			_ = ms.Close()
			return nil, err
		}
	}
	return ms, err
}

// openEtcd connects to etcd and makes sure a member answers within the dial
// timeout, so that an unreachable cluster is reported at once rather than
// after the store's request timeout.
func openEtcd(ctx context.Context, a address, mode openMode, ef *etcdFlags) (storage.MetaStore, error) {
	cfg, err := ef.clientConfig(a)
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(*cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %s: %w", strings.Join(a.endpoints, ","), err)
	}
	pctx, cancel := context.WithTimeout(ctx, ef.dialTimeout)
	defer cancel()
	resp, err := cli.Get(pctx, a.root+"/"+storage.KeyEtcdVersion+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		_ = cli.Close()
		if pctx.Err() != nil && ctx.Err() == nil {
			msg := fmt.Sprintf("etcd %s did not answer within %v", strings.Join(a.endpoints, ","), ef.dialTimeout)
			if why := diagnose(a.endpoints[0], cfg.TLS, ef.dialTimeout); why != "" {
				msg += " (" + why + ")"
			}
			return nil, errors.New(msg)
		}
		if errors.Is(err, rpctypes.ErrUserEmpty) {
			return nil, fmt.Errorf("etcd %s: %w (the cluster requires a user: give --user)", strings.Join(a.endpoints, ","), err)
		}
		return nil, fmt.Errorf("etcd %s: %w", strings.Join(a.endpoints, ","), err)
	}
	if resp.Count == 0 && mode == readOnly {
		err := emptyRootError(pctx, cli, a)
		_ = cli.Close()
		return nil, err
	}
	ms, err := storage.NewEtcdStoreFromClient(cli, a.root)
	if err != nil {
		_ = cli.Close()
		return nil, err
	}
	return &ownedClientStore{MetaStore: ms, cli: cli}, nil
}

// diagnose finds out why an etcd endpoint does not answer, as far as a
// connection and a TLS handshake tell: gRPC only reports the deadline.
func diagnose(endpoint string, tlsCfg *tls.Config, timeout time.Duration) string {
	timeout = min(timeout, 2*time.Second)
	conn, err := net.DialTimeout("tcp", endpoint, timeout)
	if err != nil {
		return err.Error()
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if tlsCfg == nil {
		// Only to tell whether the server speaks TLS: nothing is sent
		// over this connection, so the certificate need not be checked.
		probe := tls.Client(conn, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // diagnostic probe only
		if probe.Handshake() == nil {
			return "the server speaks TLS: give --cacert (and --cert and --key if it wants client certificates)"
		}
		return ""
	}
	cfg := tlsCfg.Clone()
	if cfg.ServerName == "" {
		if host, _, err := net.SplitHostPort(endpoint); err == nil {
			cfg.ServerName = host
		}
	}
	tc := tls.Client(conn, cfg)
	if err := tc.Handshake(); err != nil {
		return "TLS: " + err.Error()
	}
	// With TLS 1.3 the server judges the client's certificate after the
	// handshake; its verdict arrives with the first read.
	_ = tc.SetReadDeadline(time.Now().Add(timeout / 4))
	if _, err := tc.Read(make([]byte, 1)); err != nil {
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			return "TLS: " + err.Error()
		}
	}
	return ""
}

// ownedClientStore closes the etcd client with the store.
type ownedClientStore struct {
	storage.MetaStore
	cli *clientv3.Client
}

func (s *ownedClientStore) Close() error {
	return errors.Join(s.MetaStore.Close(), s.cli.Close())
}
