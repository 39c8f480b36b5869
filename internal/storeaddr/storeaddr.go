// Package storeaddr parses store addresses and opens the stores they name,
// for every command of this module (snapmeta, snapmeta-snapshotter), so
// that an address means the same thing everywhere:
//
//	bolt:///var/lib/x/metadata.db    a bbolt file (absolute path)
//	bolt://rel/metadata.db           a bbolt file (relative path)
//	/var/lib/x/metadata.db           a bare path is a bbolt file too
//	etcd://h1:2379,h2:2379/root      etcd endpoints and the store's root
//
// Every error that is a mistake in the address or in the flags is a
// *UsageError, so that a command can tell it from a store that failed.
package storeaddr

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

	"github.com/spf13/pflag"
	bolt "go.etcd.io/bbolt"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/snapmeta/storage"
)

// Help describes the address syntax and the etcd flags, for a command's
// long help.
const Help = `Store addresses:
  bolt:///path/to/metadata.db        a bbolt file (a bare path means the same)
  etcd://host:2379[,host:2379]/ROOT  an etcd cluster and the store's root key;
                                     TLS with --cacert/--cert/--key, auth with
                                     --user (password from SNAPMETA_PASSWORD
                                     or --user name:pass)`

// BoltLockTimeout is how long Open waits for another process to release a
// bbolt file before it reports the file as locked (a *LockedError).
const BoltLockTimeout = time.Second

// DefaultDialTimeout is the default of --dial-timeout.
const DefaultDialTimeout = 5 * time.Second

// The engines an Address names (Address.Engine).
const (
	Bolt = "bolt"
	Etcd = "etcd"
)

// UsageError is a mistake on the command line: an address or a flag that
// cannot be right whatever the store holds.
type UsageError struct{ Msg string }

// Error returns the message, which names the mistake and what is wanted.
func (e *UsageError) Error() string { return e.Msg }

// Usagef returns a *UsageError.
func Usagef(format string, args ...any) error {
	return &UsageError{Msg: fmt.Sprintf(format, args...)}
}

// Address is a parsed store address.
type Address struct {
	// Raw is the address as given.
	Raw string
	// Engine is Bolt or Etcd.
	Engine string
	// Path is the bbolt file (Engine Bolt).
	Path string
	// Endpoints (host:port, never empty) and Root (never empty) are the
	// etcd cluster and key prefix (Engine Etcd).
	Endpoints []string
	Root      string
}

// String returns the address as given.
func (a Address) String() string { return a.Raw }

// SameStore reports whether a and b name the same store: the same bbolt
// file (through any path), or the same etcd root on clusters that share an
// endpoint.
func (a Address) SameStore(b Address) bool {
	if a.Engine != b.Engine {
		return false
	}
	if a.Engine == Bolt {
		pa, errA := filepath.Abs(a.Path)
		pb, errB := filepath.Abs(b.Path)
		if errA != nil || errB != nil {
			return a.Path == b.Path
		}
		if pa == pb {
			return true
		}
		sa, errA := os.Stat(pa)
		sb, errB := os.Stat(pb)
		return errA == nil && errB == nil && os.SameFile(sa, sb)
	}
	if a.Root != b.Root {
		return false
	}
	for _, ea := range a.Endpoints {
		for _, eb := range b.Endpoints {
			if ea == eb {
				return true
			}
		}
	}
	return false
}

// Parse parses a store address (see Help). Every error is a *UsageError.
func Parse(s string) (Address, error) {
	a := Address{Raw: s}
	switch {
	case s == "":
		return a, Usagef("empty store address")
	case strings.HasPrefix(s, "bolt://"):
		a.Engine, a.Path = Bolt, strings.TrimPrefix(s, "bolt://")
		if a.Path == "" {
			return a, Usagef("store address %q has no file path (want bolt:///path/to/metadata.db)", s)
		}
	case strings.HasPrefix(s, "etcd://"):
		rest := strings.TrimPrefix(s, "etcd://")
		hosts, root, _ := strings.Cut(rest, "/")
		if hosts == "" {
			return a, Usagef("store address %q has no etcd endpoint (want etcd://host:2379/ROOT)", s)
		}
		if root == "" {
			return a, Usagef("store address %q has no root (want etcd://host:2379/ROOT)", s)
		}
		for _, h := range strings.Split(hosts, ",") {
			if h == "" {
				return a, Usagef("store address %q has an empty endpoint", s)
			}
			// gRPC would try port 443 until the dial timeout.
			if _, port, err := net.SplitHostPort(h); err != nil || port == "" {
				return a, Usagef("etcd endpoint %q of store address %q has no port (want host:2379)", h, s)
			}
			a.Endpoints = append(a.Endpoints, h)
		}
		a.Engine, a.Root = Etcd, root
	case strings.Contains(s, "://"):
		scheme, _, _ := strings.Cut(s, "://")
		return a, Usagef("unknown store address scheme %q in %q (want bolt:// or etcd://)", scheme, s)
	default:
		a.Engine, a.Path = Bolt, s
	}
	return a, nil
}

// EtcdFlags are the connection settings shared by every etcd address. The
// zero value connects without TLS or authentication; DialTimeout must then
// be set (AddFlags defaults it to DefaultDialTimeout).
type EtcdFlags struct {
	// CACert, Cert and Key are PEM files; any of them turns TLS on, and
	// Cert and Key go together.
	CACert string
	Cert   string
	Key    string
	// User is "name" (the password comes from $SNAPMETA_PASSWORD) or
	// "name:password".
	User string
	// DialTimeout bounds connecting and the first answer at Open.
	DialTimeout time.Duration
	// PasswordEnv, when set, is the variable read first for User's
	// password ($SNAPMETA_PASSWORD after it): a command that opens two
	// stores as two users (migrate) gives each its own.
	PasswordEnv string
}

// AddFlags registers --cacert, --cert, --key, --user and --dial-timeout
// on fs, with the same names, defaults and help in every command.
func (f *EtcdFlags) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&f.CACert, "cacert", "", "etcd: verify the servers with this CA bundle (turns TLS on)")
	fs.StringVar(&f.Cert, "cert", "", "etcd: client certificate (turns TLS on; with --key)")
	fs.StringVar(&f.Key, "key", "", "etcd: client certificate's private key")
	fs.StringVar(&f.User, "user", "", "etcd: user name, or name:password (else the password comes from SNAPMETA_PASSWORD)")
	fs.DurationVar(&f.DialTimeout, "dial-timeout", DefaultDialTimeout, "etcd: how long to wait for the cluster to answer")
}

// ClientConfig builds the etcd client configuration for a. A mistake in
// the flags is a *UsageError.
func (f *EtcdFlags) ClientConfig(a Address) (*clientv3.Config, error) {
	cfg := &clientv3.Config{
		Endpoints:   a.Endpoints,
		DialTimeout: f.DialTimeout,
		Logger:      zap.NewNop(),
	}
	if f.CACert != "" || f.Cert != "" || f.Key != "" {
		if (f.Cert == "") != (f.Key == "") {
			return nil, Usagef("--cert and --key go together")
		}
		info := transport.TLSInfo{CertFile: f.Cert, KeyFile: f.Key, TrustedCAFile: f.CACert}
		tlsCfg, err := info.ClientConfig()
		if err != nil {
			// The files named on the command line are missing or wrong.
			return nil, Usagef("TLS settings: %v", err)
		}
		cfg.TLS = tlsCfg
	}
	if f.User != "" {
		name, pass, ok := strings.Cut(f.User, ":")
		envs := []string{"SNAPMETA_PASSWORD"}
		if f.PasswordEnv != "" {
			envs = append([]string{f.PasswordEnv}, envs...)
		}
		for _, env := range envs {
			if !ok {
				pass, ok = os.LookupEnv(env)
			}
		}
		if name == "" {
			return nil, Usagef("--user needs a user name")
		}
		if !ok {
			return nil, Usagef("no password for etcd user %q: set %s or give the user as %s:PASSWORD", name, strings.Join(envs, " or "), name)
		}
		cfg.Username, cfg.Password = name, pass
	}
	return cfg, nil
}

// Mode says what a command does with a store.
type Mode int

const (
	// ReadOnly opens a bbolt file read-only (a shared lock: other readers
	// may run, a daemon holding the file blocks it) and never creates it.
	ReadOnly Mode = iota
	// ReadWrite opens a bbolt file for writing, creating it if needed
	// (its directory must exist).
	ReadWrite
)

// LockedError reports a bbolt file held by another process.
type LockedError struct {
	Path string
	Err  error
}

// Error says which file is locked and what to do about it.
func (e *LockedError) Error() string {
	return fmt.Sprintf("%s is locked by another process; stop it or copy the file", e.Path)
}

// Unwrap returns the store's error (storage.ErrLocked).
func (e *LockedError) Unwrap() error { return e.Err }

// Open opens the store at a. It returns within about BoltLockTimeout for a
// bbolt file another process holds (a *LockedError), and within
// ef.DialTimeout for an etcd cluster that does not answer, with an error
// saying why as far as a connection and a TLS handshake tell. The store
// returned owns every connection Open made: Close releases them all.
// etcdOpts are given to storage.NewEtcdStoreFromClient (a host scope, say);
// a bbolt address with etcdOpts is a *UsageError.
func Open(ctx context.Context, a Address, mode Mode, ef *EtcdFlags, etcdOpts ...storage.EtcdOpt) (storage.MetaStore, error) {
	switch a.Engine {
	case Bolt:
		if len(etcdOpts) > 0 {
			return nil, Usagef("%s is a bbolt file; etcd options (a host scope) need an etcd store", a.Raw)
		}
		return openBolt(a.Path, mode)
	case Etcd:
		return openEtcd(ctx, a, mode, ef, etcdOpts)
	}
	return nil, fmt.Errorf("unknown engine %q", a.Engine)
}

func openBolt(path string, mode Mode) (storage.MetaStore, error) {
	st, err := os.Stat(path)
	switch {
	case err == nil && st.IsDir():
		return nil, fmt.Errorf("%s is a directory, not a bbolt file", path)
	case errors.Is(err, os.ErrNotExist) && mode == ReadOnly:
		return nil, fmt.Errorf("%s does not exist", path)
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return nil, err
	}
	if err == nil && mode == ReadWrite {
		// Before anything is written into a file of another kind.
		if err := boltLayoutProblem(path); err != nil {
			return nil, err
		}
	}
	ms, err := storage.NewBoltMetaStore(path, func(o *bolt.Options) error {
		o.ReadOnly = mode == ReadOnly
		o.Timeout = BoltLockTimeout
		return nil
	})
	if errors.Is(err, storage.ErrLocked) {
		return nil, &LockedError{Path: path, Err: err}
	}
	if err == nil && mode == ReadOnly {
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
func openEtcd(ctx context.Context, a Address, mode Mode, ef *EtcdFlags, etcdOpts []storage.EtcdOpt) (storage.MetaStore, error) {
	cfg, err := ef.ClientConfig(a)
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(*cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to etcd %s: %w", strings.Join(a.Endpoints, ","), err)
	}
	pctx, cancel := context.WithTimeout(ctx, ef.DialTimeout)
	defer cancel()
	resp, err := cli.Get(pctx, a.Root+"/"+storage.KeyEtcdVersion+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		_ = cli.Close()
		if pctx.Err() != nil && ctx.Err() == nil {
			msg := fmt.Sprintf("etcd %s did not answer within %v", strings.Join(a.Endpoints, ","), ef.DialTimeout)
			if why := diagnose(a.Endpoints[0], cfg.TLS, ef.DialTimeout); why != "" {
				msg += " (" + why + ")"
			}
			return nil, errors.New(msg)
		}
		if errors.Is(err, rpctypes.ErrUserEmpty) {
			return nil, fmt.Errorf("etcd %s: %w (the cluster requires a user: give --user)", strings.Join(a.Endpoints, ","), err)
		}
		return nil, fmt.Errorf("etcd %s: %w", strings.Join(a.Endpoints, ","), err)
	}
	if resp.Count == 0 && mode == ReadOnly {
		err := emptyRootError(pctx, cli, a)
		_ = cli.Close()
		return nil, err
	}
	ms, err := storage.NewEtcdStoreFromClient(cli, a.Root, etcdOpts...)
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

// EtcdClient returns the etcd client of a store Open opened on etcd (the
// store owns it: it stays open until the store is closed), and nil for
// any other store. Commands use it to open more stores on the same root
// (a host scope's view, storage.ListHosts) without another connection.
func EtcdClient(ms storage.MetaStore) *clientv3.Client {
	if s, ok := ms.(*ownedClientStore); ok {
		return s.cli
	}
	return nil
}
