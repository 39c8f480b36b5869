package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
)

// hostRow is one host of a host-scoped root, as hosts writes it (its JSON
// fields and template fields).
type hostRow struct {
	Name      string        `json:"host"`
	Alive     bool          `json:"alive"`
	Lease     string        `json:"lease"`
	TTL       time.Duration `json:"-"`
	TTLSecs   int64         `json:"ttl_seconds"`
	Since     time.Time     `json:"since"`
	Active    int           `json:"active"`
	View      int           `json:"view"`
	Committed int           `json:"committed"`
	Shared    int           `json:"shared"`
}

var sampleHost = hostRow{Name: "h", Since: time.Unix(0, 0)}

func (a *app) hostsCommand() *cobra.Command {
	var addr, format, host string
	var asJSON, noHeaders bool
	c := &cobra.Command{
		Use:   "hosts [STORE]",
		Short: "List the hosts of a host-scoped etcd root",
		Long: `List the hosts of a host-scoped etcd root (many containerd hosts on one
root, each in a scope of its own; see storage.WithHost), in name order:
whether the host is alive (a store of it holds its lease now), the lease's
ID (hex) and TTL left, since when the host has used the root, and how many
snapshots its scope holds of each kind, and how many of its committed
snapshots are bindings of shared layers (SHARED).

--host H lists H only. A root without host scopes is reported as such
(exit 1). --format json writes one JSON object per host: {"host",
"alive", "lease", "ttl_seconds", "since", "active", "view", "committed",
"shared"}; a Go template gets the fields .Name, .Alive, .Lease, .TTL (a
time.Duration), .Since (time.Time), .Active, .View, .Committed, .Shared
(see 'snapmeta ls --help' for templates).`,
		Example: `  snapmeta hosts etcd://127.0.0.1:2379/snapshots
  snapmeta hosts -s etcd://127.0.0.1:2379/snapshots --format json
  snapmeta hosts -s etcd://127.0.0.1:2379/snapshots --format '{{.Name}} {{.Alive}}'`,
		Args: storeArgs,
		RunE: func(c *cobra.Command, args []string) error {
			if err := a.positionalStore(c, &addr, args); err != nil {
				return err
			}
			f, err := parseFormat(format, sampleHost)
			if err != nil {
				return err
			}
			if asJSON && f.name == "template" {
				return usageErrorf("--json and a --format template do not go together")
			}
			if f.name == "json" {
				asJSON = true
			}
			if ad, err := storeaddr.Parse(addr); err == nil && ad.Engine == storeaddr.Bolt {
				return usageErrorf("%s is a bbolt file: host scopes exist only on etcd roots", addr)
			}
			return a.withRoot(c.Context(), addr, storeaddr.ReadOnly, host, func(v *rootView) error {
				if !v.scoped {
					return fmt.Errorf("etcd root %q is not host-scoped: it serves one containerd, and has no hosts", v.addr.Root)
				}
				recs, leftOut, err := a.loadRoot(c.Context(), v, nil)
				if err != nil {
					return err
				}
				counts := map[string]*hostRow{}
				var rows []hostRow
				for _, h := range v.hosts {
					if host != "" && h.Name != host {
						continue
					}
					r := hostRow{Name: h.Name, Alive: h.Alive, TTL: h.TTL, TTLSecs: int64(h.TTL / time.Second), Since: h.Since}
					if h.Alive {
						r.Lease = strconv.FormatInt(int64(h.Lease), 16)
					}
					rows = append(rows, r)
				}
				for i := range rows {
					counts[rows[i].Name] = &rows[i]
				}
				for _, r := range recs {
					h := counts[r.Host]
					if h == nil {
						continue
					}
					switch snapshots.Kind(r.Kind) {
					case snapshots.KindActive:
						h.Active++
					case snapshots.KindView:
						h.View++
					case snapshots.KindCommitted:
						h.Committed++
					}
					if r.Content != "" {
						h.Shared++
					}
				}
				switch {
				case asJSON:
					enc := json.NewEncoder(a.stdout)
					enc.SetEscapeHTML(false)
					for _, r := range rows {
						if err := enc.Encode(r); err != nil {
							return err
						}
					}
				case f.name == "template":
					err = writeTemplate(a.stdout, f, rows, !noHeaders, terminalWidth(a.stdout))
				default:
					var table [][]string
					if !noHeaders {
						table = append(table, []string{"HOST", "ALIVE", "LEASE", "TTL", "SINCE", "ACTIVE", "VIEWS", "COMMITTED", "SHARED"})
					}
					for _, r := range rows {
						alive, ttl := "no", "-"
						if r.Alive {
							alive, ttl = "yes", r.TTL.String()
						}
						table = append(table, []string{r.Name, alive, dash(r.Lease), ttl, fmtTime(r.Since),
							strconv.Itoa(r.Active), strconv.Itoa(r.View), strconv.Itoa(r.Committed), strconv.Itoa(r.Shared)})
					}
					err = writeRows(a.stdout, table, terminalWidth(a.stdout), []bool{true, false, false, false, false, false, false, false, false})
				}
				return errors.Join(err, leftOut)
			})
		},
	}
	storeFlag(c, &addr)
	c.Flags().BoolVar(&asJSON, "json", false, "write JSON Lines instead of a table (--format json)")
	c.Flags().StringVar(&format, "format", "table", "table, json (JSON Lines), or a Go template (see above)")
	c.Flags().BoolVar(&noHeaders, "no-headers", false, "leave out the table's header line")
	hostFlag(c, &host, "list this host only")
	return c
}

// openHostView opens a host-scoped root and the view of one of its hosts,
// for the commands that change a host's scope.
func (a *app) withHostView(c *cobra.Command, addr, host, flag string, fn func(v *rootView, s hostScope) error) error {
	if host == "" {
		return usageErrorf("%s needs %s HOST (see '%s --help')", c.CommandPath(), flag, c.CommandPath())
	}
	if ad, err := storeaddr.Parse(addr); err == nil && ad.Engine == storeaddr.Bolt {
		return usageErrorf("%s is a bbolt file: host scopes exist only on etcd roots", addr)
	}
	v, err := a.openRoot(c.Context(), addr, storeaddr.ReadWrite, "")
	if err != nil {
		return err
	}
	defer v.Close()
	if !v.scoped {
		return usageErrorf("etcd root %q is not host-scoped (it serves one containerd): %s applies to host-scoped roots only", v.addr.Root, flag)
	}
	for _, s := range v.scopes {
		if s.host == host {
			return fn(v, s)
		}
	}
	return usageErrorf("%s %s: no such host on etcd root %q (its hosts: %s; see 'snapmeta hosts')", flag, host, v.addr.Root, hostList(v.hostNames()))
}

func (a *app) takeoverCommand() *cobra.Command {
	var addr, from, to, parent string
	var force bool
	c := &cobra.Command{
		Use:   "takeover --from-host A --to-host B KEY NAME",
		Short: "Move a gone host's active snapshot into another host's scope",
		Long: `Move the active (or view) snapshot KEY of host A's scope into host B's scope
as NAME, keeping its ID (so the data a driver keeps under that ID, e.g. an
overlay upperdir on a shared directory, is B's from then on), in one
transaction (storage.TakeOver). --parent P is the name, in B's scope, bound
to the same parent layer as KEY's parent (a shared layer B bound with
BindLayer); leave it out for a snapshot without a parent.

It is refused while A is alive (a store of A holds its lease): exit 1. A
host that vanished holds its lease until the TTL runs out ('snapmeta hosts'
shows it). --force skips that check (storage.ForceTakeOver): only when A is
known to be gone for good, since a live A would go on writing to data that
is B's.`,
		Example: `  snapmeta takeover -s etcd://127.0.0.1:2379/snapshots --from-host node-1 --to-host node-2 default/7/web web --parent sha256:abc`,
		Args:    exactArgs(2, "KEY and NAME"),
		RunE: func(c *cobra.Command, args []string) error {
			if from == "" || to == "" {
				return usageErrorf("takeover needs --from-host A and --to-host B (see '%s --help')", c.CommandPath())
			}
			if from == to {
				return usageErrorf("--from-host and --to-host are both %q", from)
			}
			return a.withHostView(c, addr, to, "--to-host", func(v *rootView, s hostScope) error {
				if !containsHost(v, from) {
					return usageErrorf("--from-host %s: no such host on etcd root %q (its hosts: %s)", from, v.addr.Root, hostList(v.hostNames()))
				}
				var snap storage.Snapshot
				err := s.ms.WithTransaction(c.Context(), true, func(ctx context.Context) (err error) {
					if force {
						snap, err = storage.ForceTakeOver(ctx, from, args[0], args[1], parent)
					} else {
						snap, err = storage.TakeOver(ctx, from, args[0], args[1], parent)
					}
					return err
				})
				if errors.Is(err, storage.ErrHostAlive) {
					// The library's words ("host is alive") would say it twice.
					return fmt.Errorf("host %q is alive (a store of it holds its lease; see 'snapmeta hosts'): stop it, or wait for its lease to run out; --force takes over anyway: %w", from, errdefs.ErrFailedPrecondition)
				}
				if err != nil {
					return err
				}
				fmt.Fprintf(a.stdout, "took over %s:%s as %s:%s (%s, ID %s)\n", from, args[0], to, args[1], Kind(snap.Kind), snap.ID)
				return nil
			})
		},
	}
	storeFlag(c, &addr)
	c.Flags().StringVar(&from, "from-host", "", "the host whose snapshot KEY is (gone)")
	c.Flags().StringVar(&to, "to-host", "", "the host that takes it over, as NAME")
	c.Flags().StringVar(&parent, "parent", "", "NAME's parent in the --to-host scope (bound to KEY's parent layer)")
	c.Flags().BoolVar(&force, "force", false, "take over even while --from-host is alive")
	return c
}

func containsHost(v *rootView, host string) bool {
	for _, h := range v.hosts {
		if h.Name == host {
			return true
		}
	}
	return false
}

func (a *app) releaseHostCommand() *cobra.Command {
	var addr string
	var force bool
	c := &cobra.Command{
		Use:   "release-host HOST",
		Short: "Empty a gone host's scope and forget the host",
		Long: `Remove every snapshot of HOST's scope (children first, in batches), dropping
its references to shared layers, then forget the host (storage.ReleaseHost).
It prints the IDs whose data may now be deleted: snapshots no other host
binds. snapmeta does not touch the data: the driver's directories of those
IDs (e.g. .../snapshots/<ID>) are left for the operator to remove (see
'snapmeta doctor').

It is refused while HOST is alive (exit 1); --force releases it anyway (a
live host would then find its snapshots gone).`,
		Example: `  snapmeta release-host -s etcd://127.0.0.1:2379/snapshots node-1`,
		Args:    exactArgs(1, "one HOST"),
		RunE: func(c *cobra.Command, args []string) error {
			return a.withHostView(c, addr, args[0], "HOST", func(v *rootView, s hostScope) error {
				freed, err := storage.ReleaseHost(c.Context(), s.ms, force)
				if errors.Is(err, storage.ErrHostAlive) {
					return fmt.Errorf("host %q is alive (a store of it holds its lease; see 'snapmeta hosts'): stop it first, or give --force: %w", args[0], errdefs.ErrFailedPrecondition)
				}
				if err != nil {
					return err
				}
				fmt.Fprintf(a.stdout, "released host %s: %d ID(s) freed\n", args[0], len(freed))
				if len(freed) > 0 {
					fmt.Fprintf(a.stdout, "freed IDs (their data may be deleted): %s\n", strings.Join(freed, " "))
					fmt.Fprintln(a.stdout, "snapmeta removes no data: delete the driver's directories of these IDs yourself (see 'snapmeta doctor')")
				}
				return nil
			})
		},
	}
	storeFlag(c, &addr)
	c.Flags().BoolVar(&force, "force", false, "release the host even while it is alive")
	return c
}
