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
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

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
}

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

Until the store has host scopes, every containerd daemon needs a store of
its own (its own etcd root): containerd's garbage collector removes every
snapshot its own database does not know, including another daemon's.

SIGTERM or SIGINT stops it cleanly: no new calls, the calls under way
finish (for up to --shutdown-timeout), the store is closed and the socket
removed. A second signal exits at once.

Exit codes: 0 stopped on a signal, 1 could not start or serve (one line on
stderr), 2 usage error.`,
		Example: `  snapmeta-snapshotter --socket /run/snapmeta/snapshotter.sock --root /var/lib/snapmeta
  snapmeta-snapshotter --socket /run/snapmeta/snapshotter.sock --root /var/lib/snapmeta \
      --store etcd://10.0.0.5:2379/hosts/node-1 --cacert ca.pem --cert me.pem --key me-key.pem`,
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
	return c
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
