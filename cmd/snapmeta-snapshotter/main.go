// Command snapmeta-snapshotter is a containerd proxy snapshotter: it serves
// containerd's snapshots API (containerd.services.snapshots.v1, over gRPC,
// as containerd 1.6 and later speak it) on a unix socket, with a driver of
// this module that keeps its files under --root and its metadata in the
// store --store names: a bbolt file (the default, <root>/metadata.db) or an
// etcd cluster.
//
// containerd uses it through a proxy plugin (docs/containerd.md):
//
//	[proxy_plugins.snapmeta]
//	  type = "snapshot"
//	  address = "/run/snapmeta/snapshotter.sock"
//
// Start-up: it refuses a socket another process serves, replaces a stale
// socket file, and fails with one line on stderr when the store cannot be
// opened (a bad address, a bbolt file another process holds, an etcd
// cluster that does not answer within --dial-timeout).
//
// Host scopes: with --host ID (or $SNAPMETA_HOST) on an etcd store, the
// daemons of several hosts share one etcd root and one data root, each in
// its host's scope, and share layers (see the drivers' package
// documentation and docs/containerd.md). A daemon whose host is still
// alive at start (a restart within --host-ttl of a crash) waits for the
// host's lease to expire, for at most the TTL and five seconds. A daemon
// whose lease expires while it runs stops (exit code 1) at the first call
// the store refuses for it, so that a new daemon takes a new lease.
//
// Shutdown: on SIGTERM or SIGINT it stops accepting, lets the calls under
// way finish for up to --shutdown-timeout (then cancels them), closes the
// driver and the store, and removes the socket. A second signal exits at
// once.
//
// Exit codes: 0 after a stop on a signal; 1 when it cannot start or serve,
// or after a second signal; 2 for a usage error.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
)

// version is set at build time (-ldflags "-X main.version=v1.2.3"); without
// it, --version reports the module version the binary was built from.
var version = ""

// maxSocketPath is the longest unix socket path Linux accepts (sun_path is
// 108 bytes with its terminating NUL).
const maxSocketPath = 107

func main() {
	// Buffered for two: the second signal must be seen while the first
	// one's shutdown is under way.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, sigs))
}

// config is the command line.
type config struct {
	socket          string
	root            string
	driver          string
	store           string
	etcd            storeaddr.EtcdFlags
	logLevel        string
	logFormat       string
	shutdownTimeout time.Duration
	// host is the host identity (--host) on a host-scoped etcd root;
	// hostTTL the TTL of its lease (--host-ttl).
	host    string
	hostTTL time.Duration
}

// validHost matches the host identities storage.WithHost accepts.
var validHost = regexp.MustCompile(`^[A-Za-z0-9.\-_:]{1,128}$`)

// hostFlagEnvs are the environment variables of the host flags, which the
// command line overrides.
var hostFlagEnvs = map[string]string{"host": "SNAPMETA_HOST", "host-ttl": "SNAPMETA_HOST_TTL"}

// exitError carries an exit code.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// run runs the command line args, serving until a signal arrives on sigs,
// and returns the exit code. Errors are one line on stderr; logs go to
// stderr too.
func run(args []string, stdout, stderr io.Writer, sigs <-chan os.Signal) int {
	var cfg config
	cmd := rootCommand(&cfg, stderr, sigs)
	cmd.SetArgs(args)
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	err := cmd.Execute()
	if err == nil {
		return 0
	}
	code := 1
	var ee *exitError
	var ue *storeaddr.UsageError
	switch {
	case errors.As(err, &ee):
		code = ee.code
	case errors.As(err, &ue):
		code = 2
	}
	if msg := oneLine(err.Error()); msg != "" {
		fmt.Fprintf(stderr, "snapmeta-snapshotter: %s\n", msg)
	}
	return code
}

func rootCommand(cfg *config, stderr io.Writer, sigs <-chan os.Signal) *cobra.Command {
	c := &cobra.Command{
		Use:   "snapmeta-snapshotter --socket PATH --root DIR [--store ADDRESS]",
		Short: "A containerd proxy snapshotter on snapmeta/storage (bbolt or etcd)",
		Long: `snapmeta-snapshotter serves containerd's snapshots API on a unix socket.
containerd reaches it through a proxy plugin in its config.toml:

  [proxy_plugins.snapmeta]
    type = "snapshot"
    address = "/run/snapmeta/snapshotter.sock"

and images and containers use it with --snapshotter snapmeta.

The driver keeps its files under --root; the snapshot metadata lives in
--store (default: the bbolt file <root>/metadata.db).

` + storeaddr.Help + `

Without --host, every containerd daemon needs a store of its own (its own
etcd root) and a data root of its own: containerd's garbage collector
removes every snapshot its own database does not know, including another
daemon's. With --host ID (or $SNAPMETA_HOST), the daemon opens the etcd
root in the scope of host ID: several daemons, each with its containerd
and its own host identity, share one etcd root and one data root (a shared
file system), each seeing only its own snapshots. Layers are shared: when
one host has unpacked a layer, another host's unpack of the same layer
binds it instead (containerd's remote-snapshot protocol), and a layer's
files stay until the last host using it removes it. The daemon holds a
lease on its host for as long as it runs; after a crash the host counts as
alive until --host-ttl (or $SNAPMETA_HOST_TTL) has passed, and a daemon
restarted within that time waits for it (logging why), for at most the TTL
and a few seconds. --host needs an etcd store.

SIGTERM or SIGINT stops it cleanly: no new calls, the calls under way
finish (for up to --shutdown-timeout), the store is closed and the socket
removed. A second signal exits at once.

Exit codes: 0 stopped on a signal, 1 could not start or serve (one line on
stderr), 2 usage error.`,
		Example: `  snapmeta-snapshotter --socket /run/snapmeta/snapshotter.sock --root /var/lib/snapmeta
  snapmeta-snapshotter --socket /run/snapmeta/snapshotter.sock --root /var/lib/snapmeta \
      --store etcd://10.0.0.5:2379/hosts/node-1 --cacert ca.pem --cert me.pem --key me-key.pem
  snapmeta-snapshotter --socket /run/snapmeta/snapshotter.sock --root /shared/snapmeta \
      --store etcd://10.0.0.5:2379/cluster-1 --host node-1 --host-ttl 10s`,
		Version:       versionString(),
		SilenceErrors: true,
		SilenceUsage:  true,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 0 {
				return storeaddr.Usagef("unexpected argument %q (see 'snapmeta-snapshotter --help')", args[0])
			}
			return nil
		},
		RunE: func(c *cobra.Command, _ []string) error {
			if err := hostFlagsFromEnv(c); err != nil {
				return err
			}
			if err := cfg.validate(); err != nil {
				return err
			}
			if err := setupLogging(cfg, stderr); err != nil {
				return err
			}
			return serve(cfg, sigs)
		},
	}
	c.SetVersionTemplate("{{.Name}} {{.Version}}\n")
	c.CompletionOptions.DisableDefaultCmd = true
	c.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return storeaddr.Usagef("%v (see 'snapmeta-snapshotter --help')", err)
	})
	f := c.Flags()
	f.StringVar(&cfg.socket, "socket", "", "unix socket to serve on (required; at most 107 bytes)")
	f.StringVar(&cfg.root, "root", "", "data root of the driver (required; created if missing)")
	f.StringVar(&cfg.driver, "driver", "native", "snapshotter driver: "+driverNames())
	f.StringVar(&cfg.store, "store", "", "the metadata store's address (default bolt://<root>/metadata.db)")
	cfg.etcd.AddFlags(f)
	f.StringVar(&cfg.logLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
	f.StringVar(&cfg.logFormat, "log-format", "text", "log format: text or json")
	f.DurationVar(&cfg.shutdownTimeout, "shutdown-timeout", 30*time.Second, "on a signal, how long calls under way may run before they are cancelled")
	f.StringVar(&cfg.host, "host", "", "host identity on a host-scoped etcd root shared with other daemons ($SNAPMETA_HOST; letters, digits, .-_:)")
	f.DurationVar(&cfg.hostTTL, "host-ttl", storage.DefaultHostTTL, "with --host: how long after a crash the host counts as alive ($SNAPMETA_HOST_TTL; whole seconds, at least 1s)")
	return c
}

// hostFlagsFromEnv sets --host and --host-ttl from their environment
// variables when the command line does not give them.
func hostFlagsFromEnv(c *cobra.Command) error {
	for _, name := range []string{"host", "host-ttl"} {
		env := hostFlagEnvs[name]
		v, ok := os.LookupEnv(env)
		if !ok || c.Flags().Changed(name) {
			continue
		}
		if err := c.Flags().Set(name, v); err != nil {
			return storeaddr.Usagef("$%s: %v (see 'snapmeta-snapshotter --help')", env, err)
		}
	}
	return nil
}

// validate checks the command line and fills in defaults.
func (cfg *config) validate() error {
	switch {
	case cfg.socket == "":
		return storeaddr.Usagef("--socket is required (see 'snapmeta-snapshotter --help')")
	case len(cfg.socket) > maxSocketPath:
		return storeaddr.Usagef("--socket %s is %d bytes long; a unix socket path has at most %d", cfg.socket, len(cfg.socket), maxSocketPath)
	case cfg.root == "":
		return storeaddr.Usagef("--root is required (see 'snapmeta-snapshotter --help')")
	case drivers[cfg.driver] == nil:
		return storeaddr.Usagef("unknown driver %q (want one of: %s)", cfg.driver, driverNames())
	case cfg.shutdownTimeout <= 0:
		return storeaddr.Usagef("--shutdown-timeout must be positive")
	case cfg.etcd.DialTimeout <= 0:
		return storeaddr.Usagef("--dial-timeout must be positive")
	case cfg.hostTTL < time.Second:
		return storeaddr.Usagef("--host-ttl %v is under a second", cfg.hostTTL)
	}
	// The root is made absolute so that the mounts handed to containerd,
	// which runs elsewhere, name real paths.
	root, err := filepath.Abs(cfg.root)
	if err != nil {
		return err
	}
	cfg.root = root
	if cfg.store == "" {
		cfg.store = filepath.Join(root, "metadata.db")
	}
	if cfg.host != "" {
		addr, err := storeaddr.Parse(cfg.store)
		if err != nil {
			return err
		}
		if addr.Engine != storeaddr.Etcd {
			return storeaddr.Usagef("--host %s needs an etcd store (--store etcd://...), not the bbolt file %s", cfg.host, addr.Path)
		}
		// As storage.WithHost would refuse it, but as a usage error.
		if !validHost.MatchString(cfg.host) {
			return storeaddr.Usagef("--host %q: a host identity is 1 to 128 bytes of letters, digits and \".-_:\"", cfg.host)
		}
	}
	return nil
}

// setupLogging points containerd's logger at stderr with the chosen level
// and format.
func setupLogging(cfg *config, stderr io.Writer) error {
	if err := log.SetLevel(cfg.logLevel); err != nil {
		return storeaddr.Usagef("--log-level %q: want trace, debug, info, warn or error", cfg.logLevel)
	}
	switch f := log.OutputFormat(cfg.logFormat); f {
	case log.TextFormat, log.JSONFormat:
		if err := log.SetFormat(f); err != nil {
			return err
		}
	default:
		return storeaddr.Usagef("--log-format %q: want text or json", cfg.logFormat)
	}
	log.L.Logger.SetOutput(stderr)
	return nil
}

// versionString is the version --version prints.
func versionString() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); ok && v == "" {
		v = bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				v += " " + s.Value
			}
		}
	}
	if v == "" {
		v = "(devel)"
	}
	return v + " " + runtime.Version()
}

// oneLine joins the lines of a (possibly joined) error message.
func oneLine(s string) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.Join(strings.Fields(l), " "); l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "; ")
}
