// Command snapmeta is the operator's tool for snapshot metadata stores made
// by github.com/snapmeta/storage (and containerd's own metadata.db files):
// inspect a store, check its invariants, export and import it as JSON
// Lines, migrate it between bbolt and etcd, and run a guided demo.
//
// Exit codes: 0 success; 1 failure (for check: problems found); 2 a usage
// error (for check: the store could not be read).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
)

func main() {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s, ok := (<-sigs).(syscall.Signal)
		if !ok {
			return
		}
		cancel(interrupted{s})
		// A command blocked where its context does not reach (a write to a
		// pipe nobody reads, a bbolt file's lock) ends anyway, as after a
		// crash: what it committed stays, and a commit in flight is
		// applied whole or not at all.
		time.Sleep(signalGrace)
		fmt.Fprintln(os.Stderr, "snapmeta: interrupted")
		os.Exit(128 + int(s))
	}()
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	signal.Stop(sigs)
	os.Exit(code)
}

// signalGrace is how long a command may take to end after a signal has
// canceled its context before the process exits without it.
const signalGrace = 500 * time.Millisecond

// interrupted is why a run's context ends when a signal stops the tool: the
// run then exits with 128 + the signal's number, as shells report it (130
// for SIGINT, 143 for SIGTERM).
type interrupted struct{ sig syscall.Signal }

func (i interrupted) Error() string { return "interrupted by " + i.sig.String() }

// app holds the settings shared by the commands of one run.
type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	etcd           storeaddr.EtcdFlags
	progress       progressFlags
	// started is set once a command's own code runs: an error before that
	// came from parsing the command line.
	started bool
	// fromEnv names the flags the environment set rather than the command
	// line (both show as changed).
	fromEnv map[string]bool
}

// exitError carries an exit code; msg, when set, is printed as the error.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return ""
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// usageError is a mistake on the command line (exit code 2). It is
// storeaddr's type, so that a bad address counts as a usage error too.
type usageError = storeaddr.UsageError

func usageErrorf(format string, args ...any) error {
	return storeaddr.Usagef(format, args...)
}

// run runs the command line args and returns the exit code.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	a := &app{stdin: stdin, stdout: stdout, stderr: stderr}
	root := a.rootCommand()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	code := 1
	var ee *exitError
	var ue *usageError
	switch {
	case errors.As(err, &ee):
		code = ee.code
	case errors.As(err, &ue), !a.started:
		code = 2
	}
	msg := sayClassOnce(oneLine(err.Error()))
	var sig interrupted
	switch {
	case ctx.Err() != nil && errors.As(context.Cause(ctx), &sig):
		// Whatever the command was doing, it ended because of the signal
		// (etcd's client reports the cancellation in its own words).
		code, msg = 128+int(sig.sig), "interrupted"
	case ctx.Err() != nil && errors.Is(err, context.Canceled):
		msg = strings.Replace(msg, "context canceled", "interrupted", 1)
	}
	if msg != "" {
		if code == 2 && !a.started && !strings.Contains(msg, "(see '") {
			msg += " (see 'snapmeta --help')"
		}
		fmt.Fprintf(stderr, "snapmeta: %s\n", msg)
	}
	return code
}

// oneLine joins the lines of a (possibly joined) error message, and turns
// cobra's suggestions for a mistyped command into one parenthesis.
func oneLine(s string) string {
	if head, sugg, ok := strings.Cut(s, "\n\nDid you mean this?\n"); ok {
		return oneLine(head) + " (did you mean " + strings.Join(strings.Fields(sugg), " or ") + "?)"
	}
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.Join(strings.Fields(l), " "); l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "; ")
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "snapmeta",
		Short: "Inspect, check, export, import and migrate snapshot metadata stores",
		Long: `snapmeta works on the snapshot metadata of containerd snapshotter drivers:
a bbolt file (metadata.db, as containerd's own store writes it) or an etcd
cluster shared by many hosts (github.com/snapmeta/storage).

` + storeaddr.Help + `

The store is --store, $SNAPMETA_STORE, or the argument of ls, tree, ids,
check and export (for ls: the first argument, when it has a scheme or names
a file that exists); the argument wins over $SNAPMETA_STORE, and must name
the same store as --store when both are given.

Read commands (ls, info, tree, ids, check, export) open a bbolt file
read-only; while a running daemon holds the file they report it as locked.

On an etcd root shared by many hosts, each in its own scope (host-scoped:
see 'snapmeta hosts'), ls, tree, ids, export, check and doctor cover every
host, or with --host H ($SNAPMETA_HOST) H's only, and show each snapshot's
host; info finds a name in the one host that has it (--host when several
do); takeover and release-host act on a host gone; import and migrate carry
the scopes. --host elsewhere (bbolt, a root without host scopes) is a usage
error.

Every flag may be set from the environment instead: SNAPMETA_ and the flag's
name in capitals, with _ for - (SNAPMETA_STORE, SNAPMETA_DIAL_TIMEOUT,
SNAPMETA_CACERT, ...); the command line wins.

Long commands (check, export, import, migrate, salvage) show their
progress on stderr, never on stdout: on a terminal a line redrawn in place
(count, rate, percent and a bar where the total is known), elsewhere a line
at most every --progress-interval (default 5s) and a summary at the end. A
phase that ends before its first line is due shows nothing. --no-progress
(or SNAPMETA_NO_PROGRESS=1) turns it off.

Exit codes: 0 success, 1 failure (check: problems found), 2 usage error
(check: the store could not be read), 128+n when signal n stops it (130 for
an interrupt).`,
		Example: `  snapmeta demo
  snapmeta ls /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/metadata.db
  snapmeta check etcd://10.0.0.5:2379/snapshots
  snapmeta tree --store etcd://10.0.0.5:2379/snapshots --cacert ca.pem --cert me.pem --key me-key.pem
  snapmeta migrate --from bolt:///backup/metadata.db --to etcd://10.0.0.5:2379/snapshots`,
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(c *cobra.Command, _ []string) error {
			fromEnv, err := flagsFromEnv(c)
			if err != nil {
				return err
			}
			a.fromEnv = fromEnv
			if a.etcd.DialTimeout <= 0 {
				return usageErrorf("--dial-timeout must be positive, not %v (see '%s --help')", a.etcd.DialTimeout, c.CommandPath())
			}
			if a.progress.interval <= 0 {
				return usageErrorf("--progress-interval must be positive, not %v (see '%s --help')", a.progress.interval, c.CommandPath())
			}
			a.started = true
			return nil
		},
	}
	root.CompletionOptions.DisableDefaultCmd = true
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageErrorf("%v (see '%s --help')", err, c.CommandPath())
	})
	a.etcd.AddFlags(root.PersistentFlags())
	a.progress.addFlags(root.PersistentFlags())

	root.AddCommand(
		a.demoCommand(),
		a.lsCommand(),
		a.infoCommand(),
		a.treeCommand(),
		a.idsCommand(),
		a.checkCommand(),
		a.doctorCommand(),
		a.exportCommand(),
		a.importCommand(),
		a.migrateCommand(),
		a.salvageCommand(),
		a.hostsCommand(),
		a.takeoverCommand(),
		a.releaseHostCommand(),
		a.versionCommand(),
		a.completionCommand(),
	)
	root.SetHelpCommand(helpCommand(root))
	return root
}

// helpCommand replaces cobra's help command so that it, too, has an
// example.
func helpCommand(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:     "help [command]",
		Short:   "Help about any command",
		Example: "  snapmeta help migrate",
		RunE: func(c *cobra.Command, args []string) error {
			cmd, rest, err := root.Find(args)
			if err != nil || cmd == nil || len(rest) > 0 {
				return usageErrorf("unknown help topic %q", strings.Join(args, " "))
			}
			cmd.InitDefaultHelpFlag()
			return cmd.Help()
		},
	}
}

// storeFlag adds --store to a command.
func storeFlag(c *cobra.Command, target *string) {
	def := os.Getenv("SNAPMETA_STORE")
	c.Flags().StringVarP(target, "store", "s", def, "the store's address (default $SNAPMETA_STORE)")
}

// schemeRE is the start of an address with a scheme (bolt://, etcd://, or
// a mistyped one that Parse then names). A filter cannot begin so: a field
// name is followed by an operator, a dot or a comma, never by "://".
var schemeRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*://`)

// looksLikeStore is ls's rule for its first argument: a store when it has
// a scheme or names an existing file or directory, a filter otherwise. It
// cannot be ambiguous: a filter the operator means can be written after
// --store instead, and a store can always be given with a scheme.
func looksLikeStore(arg string) bool {
	if schemeRE.MatchString(arg) {
		return true
	}
	_, err := os.Stat(arg)
	return err == nil
}

// storeFromArg makes pos, a store given as a positional argument, the
// command's store. --store given on the command line too must name the
// same store; $SNAPMETA_STORE gives way to it, as every variable does to
// the command line.
func (a *app) storeFromArg(c *cobra.Command, addr *string, pos string) error {
	if c.Flags().Changed("store") && !a.fromEnv["store"] && *addr != pos {
		fa, errF := storeaddr.Parse(*addr)
		pa, errP := storeaddr.Parse(pos)
		if errF != nil || errP != nil || !fa.SameStore(pa) {
			return usageErrorf("two stores given: --store %s and %s (see '%s --help')", *addr, pos, c.CommandPath())
		}
	}
	*addr = pos
	return nil
}

// storeArgs is the Args of a command whose only positional argument is
// its store: at most one, taken as the store.
func storeArgs(c *cobra.Command, args []string) error {
	if len(args) > 1 {
		return usageErrorf("%s takes at most one argument, the STORE (see '%s --help')", c.CommandPath(), c.CommandPath())
	}
	return nil
}

// positionalStore applies storeFromArg to a storeArgs command's argument.
// It runs in RunE, after the environment has set the flags: Args runs
// before PersistentPreRunE.
func (a *app) positionalStore(c *cobra.Command, addr *string, args []string) error {
	if len(args) == 1 {
		return a.storeFromArg(c, addr, args[0])
	}
	return nil
}

// args checkers that report usage errors.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != n {
			return usageErrorf("%s takes %s (see '%s --help')", c.CommandPath(), what, c.CommandPath())
		}
		return nil
	}
}

func maxArgs(n int, what string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) > n {
			return usageErrorf("%s takes at most %s (see '%s --help')", c.CommandPath(), what, c.CommandPath())
		}
		return nil
	}
}

// open parses and opens the store named by --store or the argument.
func (a *app) open(ctx context.Context, addr string, mode storeaddr.Mode) (storeHandle, error) {
	if addr == "" {
		return storeHandle{}, usageErrorf("no store given: name it as the argument, use --store ADDRESS or set SNAPMETA_STORE")
	}
	ad, err := storeaddr.Parse(addr)
	if err != nil {
		return storeHandle{}, err
	}
	ms, err := storeaddr.Open(ctx, ad, mode, &a.etcd)
	if err != nil {
		return storeHandle{}, err
	}
	return storeHandle{MetaStore: ms, addr: ad}, nil
}
