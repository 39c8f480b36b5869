package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
)

func (a *app) migrateCommand() *cobra.Command {
	var from, to string
	var batch int
	var fromCreds, toCreds sideCreds
	c := &cobra.Command{
		Use:   "migrate --from SOURCE --to TARGET",
		Short: "Copy every snapshot from one store to another, IDs unchanged",
		Long: `Copy every snapshot of SOURCE to TARGET with its ID, kind, parent, labels,
times and usage unchanged (a driver's directories are named by ID), parents
before children, --batch snapshots per transaction (at most 63 into etcd:
see 'snapmeta import --help'). Stop the daemons using
either store first: SOURCE is read once, at the start.

The target must be empty or hold only snapshots identical to the source's:
migrate is resumable, so running it again after an interruption skips what
is already there; any real difference is refused before anything is
written. At the end both stores are compared (counts and every record) and
the target is checked (see 'snapmeta check'); a mismatch or a problem fails
the command.

A host-scoped etcd SOURCE (many hosts on one root) is copied host by host
into the same hosts' scopes of an etcd TARGET that is empty or host-scoped,
IDs kept and shared layers bound again with their references; each target
scope is opened as its host (holding its lease, so the host cannot start
meanwhile), which is refused (exit 1) while that host runs. The ID
allocator (root-wide) is carried over too; verification compares host by
host. Such a source cannot go into a bbolt file or an etcd root holding
snapshots without host scopes (exit 2).

The etcd flags (--cacert, --cert, --key, --user) apply to both stores.
--from-cacert, --from-cert, --from-key and --from-user (and --to-...) set
one store's own instead, where the two clusters want different
credentials; a flag not given for a side falls back to the shared one.
--from-cert and --from-key go together (as do --to-cert and --to-key), and
replace --cert and --key as a pair. The password of --from-user NAME comes
from $SNAPMETA_FROM_PASSWORD, else $SNAPMETA_PASSWORD (--to-user: from
$SNAPMETA_TO_PASSWORD first).

Each phase (checking and reading the source, reading the target, copying,
verifying, checking the target) shows its progress on stderr: a bar on a
terminal, otherwise a line at most every --progress-interval (see
'snapmeta --help'); --no-progress turns it off.`,
		Example: `  snapmeta migrate --from /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/metadata.db \
      --to etcd://10.0.0.5:2379,10.0.0.6:2379/snapshots --cacert ca.pem --cert me.pem --key me-key.pem
  snapmeta migrate --from etcd://127.0.0.1:2379/snapshots --to bolt:///backup/metadata.db
  snapmeta migrate --from etcd://old:2379/snaps --from-user reader:pw \
      --to etcd://new:2379/snaps --to-cacert new-ca.pem --to-cert me.pem --to-key me-key.pem`,
		Args: exactArgs(0, "no arguments (use --from and --to)"),
		RunE: func(c *cobra.Command, _ []string) error {
			if from == "" || to == "" {
				return usageErrorf("migrate needs --from SOURCE and --to TARGET")
			}
			if err := checkBatch(batch, to); err != nil {
				return err
			}
			src, err := storeaddr.Parse(from)
			if err != nil {
				return err
			}
			dst, err := storeaddr.Parse(to)
			if err != nil {
				return err
			}
			if src.SameStore(dst) {
				return usageErrorf("--from and --to name the same store")
			}
			srcEtcd, err := fromCreds.apply(a.etcd)
			if err != nil {
				return err
			}
			dstEtcd, err := toCreds.apply(a.etcd)
			if err != nil {
				return err
			}
			// A mistake in either side's credentials is found before the
			// source is read, not after.
			for _, side := range []struct {
				name string
				ad   storeaddr.Address
				ef   *storeaddr.EtcdFlags
			}{{"source", src, &srcEtcd}, {"target", dst, &dstEtcd}} {
				if side.ad.Engine != storeaddr.Etcd {
					continue
				}
				if _, err := side.ef.ClientConfig(side.ad); err != nil {
					return usageErrorf("%s: %v", side.name, err)
				}
			}
			return a.migrate(c.Context(), src, dst, &srcEtcd, &dstEtcd, batch)
		},
	}
	c.Flags().StringVar(&from, "from", "", "address of the store to copy")
	c.Flags().StringVar(&to, "to", "", "address of the store to copy into (created if a missing bbolt file)")
	c.Flags().IntVar(&batch, "batch", defaultBatch, fmt.Sprintf("snapshots per transaction (at most %d into etcd)", maxEtcdBatch))
	fromCreds.addFlags(c, "from", "source")
	toCreds.addFlags(c, "to", "target")
	return c
}

// sideCreds are the etcd credentials of one side of a migration, for two
// clusters that do not accept the same ones (an old cluster's read-only
// user, a new cluster's client certificate).
type sideCreds struct {
	side                    string // "from" or "to"
	cacert, cert, key, user string
}

func (s *sideCreds) addFlags(c *cobra.Command, side, what string) {
	s.side = side
	c.Flags().StringVar(&s.cacert, side+"-cacert", "", "etcd: CA bundle for the "+what+" only (else --cacert)")
	c.Flags().StringVar(&s.cert, side+"-cert", "", "etcd: client certificate for the "+what+" only (with --"+side+"-key; else --cert)")
	c.Flags().StringVar(&s.key, side+"-key", "", "etcd: its private key (else --key)")
	c.Flags().StringVar(&s.user, side+"-user", "", "etcd: user, or name:password, for the "+what+" only (else --user)")
}

// apply returns the shared flags with this side's own in their place.
func (s sideCreds) apply(shared storeaddr.EtcdFlags) (storeaddr.EtcdFlags, error) {
	ef := shared
	if s.cacert != "" {
		ef.CACert = s.cacert
	}
	// A certificate and its key are one credential: half of one side's and
	// half of the shared one would never load.
	if (s.cert == "") != (s.key == "") {
		return ef, usageErrorf("--%s-cert and --%s-key go together", s.side, s.side)
	}
	if s.cert != "" {
		ef.Cert, ef.Key = s.cert, s.key
	}
	if s.user != "" {
		ef.User = s.user
		ef.PasswordEnv = envName(s.side + "-password")
	}
	return ef, nil
}

func (a *app) migrate(ctx context.Context, srcAddr, dstAddr storeaddr.Address, srcEtcd, dstEtcd *storeaddr.EtcdFlags, batch int) error {
	srcMS, err := storeaddr.Open(ctx, srcAddr, storeaddr.ReadOnly, srcEtcd)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	src, err := viewRoot(ctx, storeHandle{MetaStore: srcMS, addr: srcAddr}, "")
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	defer src.Close()
	srcAny, closeSrcAny, err := src.anyScope()
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	defer closeSrcAny()
	// The source must be sound: a copy of a damaged store would be refused
	// half way. On a host-scoped root any host's view checks the root.
	prog := a.startProgress("migrate: checking the source", 0)
	problems, err := storage.Check(ctx, srcAny)
	prog.finish(err == nil)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if len(problems) > 0 {
		return fmt.Errorf("source has %d problem(s), the first: %s (see 'snapmeta check --store %s')", len(problems), problems[0], srcAddr)
	}
	prog = a.startProgress("migrate: reading the source", 0)
	srcRecs, err := loadEveryRoot(ctx, src, prog)
	prog.finish(err == nil)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	ordered, _, _ := parentFirstByHost(srcRecs)
	_, groups := byHost(ordered)

	dstMS, err := storeaddr.Open(ctx, dstAddr, storeaddr.ReadWrite, dstEtcd)
	if err != nil {
		return fmt.Errorf("target: %w", err)
	}
	defer dstMS.Close()
	// A host-scoped source goes into the same hosts' scopes of the target,
	// each opened as its host (holding its lease) for the whole migration.
	targets := []hostScope{{ms: dstMS}}
	if src.scoped {
		targets, err = scopedTargets(ctx, storeHandle{MetaStore: dstMS, addr: dstAddr}, src.hostNames())
		if err != nil {
			var ue *usageError
			if errors.As(err, &ue) {
				return err
			}
			return fmt.Errorf("target: %w", err)
		}
		defer closeScopes(targets)
	}
	// The allocator and Check are the root's, whichever scope reaches them
	// (a host-scoped source without hosts has none: the root's store).
	anyTarget := dstMS
	if len(targets) > 0 {
		anyTarget = targets[0].ms
	}
	loadTargets := func(prog *progress) ([]Record, error) {
		var recs []Record
		for _, t := range targets {
			rs, err := loadEvery(ctx, t.ms, prog)
			if err != nil {
				return nil, err
			}
			for i := range rs {
				rs[i].Host = t.host
			}
			recs = append(recs, rs...)
		}
		return recs, nil
	}

	// Refuse any real difference before writing anything.
	prog = a.startProgress("migrate: reading the target", 0)
	dstRecs, err := loadTargets(prog)
	prog.finish(err == nil)
	if err != nil {
		return fmt.Errorf("target: %w", err)
	}
	present, err := compareTarget(srcRecs, dstRecs)
	if err != nil {
		return err
	}

	fmt.Fprintf(a.stdout, "migrating %d snapshots from %s to %s", len(ordered), srcAddr, dstAddr)
	if src.scoped {
		fmt.Fprintf(a.stdout, " (%d host scope(s))", len(targets))
	}
	if present > 0 {
		fmt.Fprintf(a.stdout, " (%d already there, resuming)", present)
	}
	fmt.Fprintln(a.stdout)

	prog = a.startProgress("migrate: copying", len(ordered))
	var stats writeStats
	for _, t := range targets {
		s, err := writeRecords(ctx, t.ms, groups[t.host], writeOptions{
			batch:        batch,
			skipExisting: true,
			progress:     prog.add,
		})
		stats.created += s.created
		stats.skipped += s.skipped
		if err != nil {
			prog.finish(false)
			if t.host != "" {
				err = fmt.Errorf("host %q: %w", t.host, err)
			}
			return fmt.Errorf("%w (copied %d before this; run the same command again to resume)", err, stats.created)
		}
	}
	prog.finish(true)
	fmt.Fprintf(a.stdout, "copied %d snapshots, %d were already there\n", stats.created, stats.skipped)
	if err := carryIDLimit(ctx, srcAny, anyTarget); err != nil {
		return err
	}

	// Verify: both stores read afresh, every record compared (host by
	// host on host-scoped roots).
	prog = a.startProgress("migrate: verifying the source", len(ordered))
	srcRecs, err = loadEveryRoot(ctx, src, prog)
	prog.finish(err == nil)
	if err != nil {
		return fmt.Errorf("verify: source: %w", err)
	}
	prog = a.startProgress("migrate: verifying the target", len(ordered))
	dstRecs, err = loadTargets(prog)
	prog.finish(err == nil)
	if err != nil {
		return fmt.Errorf("verify: target: %w", err)
	}
	if diffs := compareStores(srcRecs, dstRecs); len(diffs) > 0 {
		for _, d := range diffs {
			fmt.Fprintln(a.stdout, "mismatch: "+d)
		}
		return fmt.Errorf("verify: the stores differ in %d place(s)", len(diffs))
	}
	fmt.Fprintf(a.stdout, "verified: %d snapshots in each store, every record identical\n", len(srcRecs))
	prog = a.startProgress("migrate: checking the target", 0)
	problems, err = storage.Check(ctx, anyTarget)
	prog.finish(err == nil)
	if err != nil {
		return fmt.Errorf("check target: %w", err)
	}
	for _, p := range problems {
		fmt.Fprintln(a.stdout, "problem: "+p.String())
	}
	if len(problems) > 0 {
		return fmt.Errorf("check target: %d problem(s)", len(problems))
	}
	fmt.Fprintln(a.stdout, "check: target has no problems")
	return nil
}

// carryIDLimit raises the target's ID allocator to the source's, so that the
// IDs of snapshots the source removed are never handed out by the target
// either (a driver may still hold their directories).
func carryIDLimit(ctx context.Context, src, dst storage.MetaStore) error {
	var limit uint64
	err := src.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		limit, err = storage.IDLimit(ctx)
		return err
	})
	if err != nil {
		return fmt.Errorf("source: ID limit: %w", err)
	}
	err = dst.WithTransaction(ctx, true, func(ctx context.Context) error {
		return storage.RaiseIDs(ctx, limit)
	})
	if err != nil {
		return fmt.Errorf("target: raising IDs to %d: %w", limit, err)
	}
	return nil
}

// compareTarget returns how many source records the target already holds,
// identical, and refuses a target with any other snapshot.
func compareTarget(src, dst []Record) (int, error) {
	bySrc := make(map[string]Record, len(src))
	for _, r := range src {
		bySrc[recordKey(r)] = r
	}
	present := 0
	for _, t := range dst {
		s, ok := bySrc[recordKey(t)]
		if !ok {
			return 0, fmt.Errorf("target has snapshot %q, which the source lacks: migrate into an empty store (or the target of an interrupted migration)", qualify(t.Host, t.Name))
		}
		if d := diff(s, t); d != "" {
			return 0, fmt.Errorf("target has snapshot %q with a different record (source vs target: %s)", qualify(t.Host, t.Name), d)
		}
		present++
	}
	return present, nil
}

// compareStores lists every difference between two stores' records (at
// most 20, then a count).
func compareStores(src, dst []Record) []string {
	const most = 20
	var out []string
	if len(src) != len(dst) {
		out = append(out, fmt.Sprintf("source has %d snapshots, target %d", len(src), len(dst)))
	}
	byDst := make(map[string]Record, len(dst))
	for _, r := range dst {
		byDst[recordKey(r)] = r
	}
	more := 0
	note := func(s string) {
		if len(out) < most {
			out = append(out, s)
		} else {
			more++
		}
	}
	for _, s := range src {
		t, ok := byDst[recordKey(s)]
		if !ok {
			note(fmt.Sprintf("snapshot %q is missing from the target", qualify(s.Host, s.Name)))
			continue
		}
		delete(byDst, recordKey(s))
		if d := diff(s, t); d != "" {
			note(fmt.Sprintf("snapshot %q differs (source vs target: %s)", qualify(s.Host, s.Name), d))
		}
	}
	for _, t := range dst {
		if _, ok := byDst[recordKey(t)]; ok {
			note(fmt.Sprintf("snapshot %q is only in the target", qualify(t.Host, t.Name)))
		}
	}
	if more > 0 {
		out = append(out, fmt.Sprintf("... and %d more", more))
	}
	return out
}
