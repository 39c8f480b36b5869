package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
)

// storeHandle is an open store and the address it was opened from.
type storeHandle struct {
	storage.MetaStore
	addr storeaddr.Address
}

// withStore opens addr for reading, runs fn and closes the store.
func (a *app) withStore(ctx context.Context, addr string, mode storeaddr.Mode, fn func(storeHandle) error) error {
	st, err := a.open(ctx, addr, mode)
	if err != nil {
		return err
	}
	err = fn(st)
	if cerr := st.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

func (a *app) lsCommand() *cobra.Command {
	var addr, format, host string
	var asJSON, quiet, noHeaders, rawBytes bool
	c := &cobra.Command{
		Use:   "ls [STORE] [FILTER...]",
		Short: "List snapshots",
		Long: `List the snapshots of a store, in name order.

Each FILTER is a containerd filter expression over the fields kind (active,
view, committed), name, parent and labels.<key>, e.g. 'kind==committed' or
'labels."containerd.io/gc.root"'. Within one filter a comma means "and"; a
snapshot is listed when it matches any of the filters.

The store is --store, $SNAPMETA_STORE, or the first argument: that is the
store when it begins with a scheme (bolt://, etcd://) or names a file that
exists, and the first FILTER otherwise. A filter that happens to be the
name of a file is given after --store instead.

The table shows KIND NAME PARENT ID SIZE CREATED; SIZE is known for
committed snapshots only, in IEC units (KiB, MiB, ...) or, with -b, in
bytes; --no-headers leaves out the header line, -q
writes the names only. --format json (or --json) writes one JSON object per
snapshot with every field, one per line (the export format).

When stdout is a terminal, the table (and a 'table ...' template) is fitted
to its width ($COLUMNS, else the terminal's): the widest of NAME and PARENT
(of a template: of any column) is cut, ending in "…", down to 8 characters.
Written to a pipe or a file, nothing is cut.

On a host-scoped etcd root (many hosts on one root: see 'snapmeta hosts')
ls lists every host's snapshots, host by host, or with --host H only H's;
the table then begins with a HOST column and has a SHARED column: "yes"
for a binding of a shared layer (storage.CommitShared, BindLayer: several
hosts' names for one ID), "-" otherwise. JSON has "host" and, for a
binding, "content" (the layer's content key); both are left out elsewhere.

` + formatHelp,
		Example: `  snapmeta ls /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/metadata.db
  snapmeta ls etcd://127.0.0.1:2379/snapshots 'kind==active'
  snapmeta ls --store etcd://127.0.0.1:2379/snapshots 'kind==active'
  snapmeta ls -s metadata.db 'labels."containerd.io/snapshot.ref"' --json
  snapmeta ls -s metadata.db -q 'name~=^sha256:'
  snapmeta ls metadata.db -b 'kind==committed'
  snapmeta ls metadata.db --format '{{.Name}} {{.ID}}'
  snapmeta ls metadata.db --format 'table {{.Name}}\t{{.Kind}}\t{{index .Labels "containerd.io/snapshot.ref"}}'`,
		RunE: func(c *cobra.Command, filters []string) error {
			if len(filters) > 0 && looksLikeStore(filters[0]) {
				if err := a.storeFromArg(c, &addr, filters[0]); err != nil {
					return err
				}
				filters = filters[1:]
			}
			if err := storage.ValidateFilters(filters...); err != nil {
				if len(filters) > 0 && strings.ContainsAny(filters[0], "/\\") {
					// Most likely a store path with a typo.
					return usageErrorf("%q is neither a file that exists nor a filter (%v)", filters[0], err)
				}
				return usageErrorf("%v", err)
			}
			if addr == "" && len(filters) > 0 {
				return usageErrorf("no store given (%q names no file that exists, so it was taken as a filter): name the store first, use --store ADDRESS or set SNAPMETA_STORE", filters[0])
			}
			f, err := parseFormat(format, sampleRecord)
			if err != nil {
				return err
			}
			if f.name == "json" {
				asJSON = true
			}
			if quiet && asJSON {
				return usageErrorf("-q writes names only; it does not go with JSON")
			}
			if quiet && f.name == "template" {
				return usageErrorf("-q writes names only; it does not go with a --format template")
			}
			if asJSON && f.name == "template" {
				return usageErrorf("--json and a --format template do not go together")
			}
			return a.withRoot(c.Context(), addr, storeaddr.ReadOnly, host, func(v *rootView) error {
				recs, leftOut, err := a.loadRoot(c.Context(), v, nil, filters...)
				if err != nil {
					return err
				}
				switch {
				case asJSON:
					err = writeJSONLines(a.stdout, recs)
				case quiet:
					err = writeNames(a.stdout, recs)
				case f.name == "template":
					err = writeTemplate(a.stdout, f, recs, !noHeaders, terminalWidth(a.stdout))
				default:
					err = writeTable(a.stdout, recs, !noHeaders, rawBytes, v.scoped, terminalWidth(a.stdout))
				}
				return errors.Join(err, leftOut)
			})
		},
	}
	storeFlag(c, &addr)
	c.Flags().BoolVar(&asJSON, "json", false, "write JSON Lines instead of a table (--format json)")
	c.Flags().StringVar(&format, "format", "table", "table, json (JSON Lines), or a Go template (see above)")
	c.Flags().BoolVarP(&quiet, "quiet", "q", false, "write the names only, one per line")
	c.Flags().BoolVar(&noHeaders, "no-headers", false, "leave out the table's header line")
	c.Flags().BoolVarP(&rawBytes, "bytes", "b", false, "sizes in bytes instead of KiB, MiB, ...")
	hostFlag(c, &host, "on a host-scoped etcd root: list this host's snapshots only")
	return c
}

// writeNames writes one name per line, for scripts.
func writeNames(w io.Writer, recs []Record) error {
	bw := bufio.NewWriter(w)
	for _, r := range recs {
		bw.WriteString(r.Name)
		bw.WriteByte('\n')
	}
	return bw.Flush()
}

func writeJSONLines(w io.Writer, recs []Record) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	for _, r := range recs {
		if err := enc.Encode(r); err != nil {
			return err
		}
	}
	return nil
}

// writeTable writes the ls table; rawBytes writes sizes as byte counts,
// for scripts and for comparing sizes exactly. With a width (a terminal's;
// 0 for none) the names and parents are cut to fit it.
// On a host-scoped root (scoped) the table has HOST and SHARED columns.
func writeTable(w io.Writer, recs []Record, header, rawBytes, scoped bool, width int) error {
	rows := make([][]string, 0, len(recs)+1)
	if !scoped {
		if header {
			rows = append(rows, []string{"KIND", "NAME", "PARENT", "ID", "SIZE", "CREATED"})
		}
		for _, r := range recs {
			rows = append(rows, []string{r.Kind.String(), r.Name, dash(r.Parent), r.ID, sizeOf(r, rawBytes), fmtTime(r.Created)})
		}
		return writeRows(w, rows, width, []bool{false, true, true, false, false, false})
	}
	if header {
		rows = append(rows, []string{"HOST", "KIND", "NAME", "PARENT", "ID", "SIZE", "SHARED", "CREATED"})
	}
	for _, r := range recs {
		rows = append(rows, []string{r.Host, r.Kind.String(), r.Name, dash(r.Parent), r.ID, sizeOf(r, rawBytes), sharedMark(r), fmtTime(r.Created)})
	}
	return writeRows(w, rows, width, []bool{false, false, true, true, false, false, false, false})
}

// sharedMark is the SHARED column: whether the snapshot is a binding of a
// shared layer.
func sharedMark(r Record) string {
	if r.Content != "" {
		return "yes"
	}
	return "-"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// sizeOf is the size of a committed snapshot, in IEC units or in bytes,
// and "-" for others.
func sizeOf(r Record, rawBytes bool) string {
	if snapshots.Kind(r.Kind) != snapshots.KindCommitted {
		return "-"
	}
	if rawBytes {
		return strconv.FormatInt(r.Usage.Size, 10)
	}
	return humanBytes(r.Usage.Size)
}

// humanBytes writes n in IEC units with one decimal.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n)
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB", "PiB"} {
		v /= unit
		if v < unit && v > -unit {
			return fmt.Sprintf("%.1f %s", v, u)
		}
	}
	return fmt.Sprintf("%.1f EiB", v/unit)
}

// fmtTime writes a time in UTC to the second; a zero time is "-".
func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

// infoJSON is what info --json writes: the record plus what follows from
// the store's structure.
type infoJSON struct {
	Record
	ParentIDs []string
	Children  []string
}

// MarshalJSON writes the record's fields in their usual order, with the
// parent chain and the children.
func (i infoJSON) MarshalJSON() ([]byte, error) {
	labels := i.Labels
	if labels == nil {
		labels = map[string]string{}
	}
	return json.Marshal(struct {
		Name      string            `json:"name"`
		ID        string            `json:"id"`
		Kind      Kind              `json:"kind"`
		Parent    string            `json:"parent"`
		ParentIDs []string          `json:"parent_ids"`
		Labels    map[string]string `json:"labels"`
		Created   time.Time         `json:"created"`
		Updated   time.Time         `json:"updated"`
		Usage     Usage             `json:"usage"`
		Children  []string          `json:"children"`
		Host      string            `json:"host,omitempty"`
		Content   string            `json:"content,omitempty"`
	}{i.Name, i.ID, i.Kind, i.Parent, nonNil(i.ParentIDs), labels, i.Created.UTC(), i.Updated.UTC(), i.Usage, nonNil(i.Children), i.Host, i.Content})
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func (a *app) infoCommand() *cobra.Command {
	var addr, format, host string
	var asJSON, rawBytes bool
	c := &cobra.Command{
		Use:   "info NAME",
		Short: "Show every field of one snapshot",
		Long: `Show every field of one snapshot: kind, ID, parent, the IDs of its parent
chain (immediate parent first: the directories an overlay driver stacks
under it), timestamps, usage, labels and children. The size is in IEC units
with the byte count, or with -b the byte count alone; --json always writes
bytes.

--format json is --json, --format table the view above; --format also takes
a Go template (text/template), as ls does (see 'snapmeta ls --help'), with
the fields of ls's templates and .ParentIDs and .Children (lists: {{join
.Children ","}}); a 'table ...' template writes a header and one row.

On a host-scoped etcd root a name belongs to a host's scope: --host H looks
in H's; without it the name is looked up in every host's, and must be in
exactly one (a name several hosts have is refused, naming them). The view
then shows the Host, and for a binding of a shared layer its Content key
(JSON: "host", "content").`,
		Example: `  snapmeta info --store metadata.db my-container
  snapmeta info --store etcd://127.0.0.1:2379/snapshots my-container --json
  snapmeta info --store metadata.db my-container --format '{{.ID}} {{join .ParentIDs ":"}}'`,
		Args: exactArgs(1, "one snapshot NAME"),
		RunE: func(c *cobra.Command, args []string) error {
			var f listFormat
			if format != "" {
				var err error
				if f, err = parseFormat(format, infoJSON{Record: sampleRecord}); err != nil {
					return err
				}
				switch {
				case f.name == "json":
					asJSON = true
				case asJSON:
					return usageErrorf("--json and a --format template do not go together")
				}
			}
			return a.withRoot(c.Context(), addr, storeaddr.ReadOnly, host, func(v *rootView) error {
				s, err := findScope(c.Context(), v, args[0])
				if err != nil {
					return err
				}
				info, problem, err := loadInfo(c.Context(), s.ms, args[0], v.scoped)
				if err != nil {
					return err
				}
				info.Host = s.host
				switch {
				case f.tmpl != nil:
					err = writeTemplate(a.stdout, f, []infoJSON{info}, true, terminalWidth(a.stdout))
				case asJSON:
					enc := json.NewEncoder(a.stdout)
					enc.SetEscapeHTML(false)
					enc.SetIndent("", "  ")
					err = enc.Encode(info)
				default:
					err = writeInfo(a.stdout, info, rawBytes)
				}
				if problem != nil {
					return errors.Join(err, &exitError{code: 1, err: problem})
				}
				return err
			})
		},
	}
	storeFlag(c, &addr)
	c.Flags().BoolVar(&asJSON, "json", false, "write JSON")
	c.Flags().StringVar(&format, "format", "", "table (the view above), json, or a Go template (see above)")
	c.Flags().BoolVarP(&rawBytes, "bytes", "b", false, "the size in bytes only, not in KiB, MiB, ...")
	hostFlag(c, &host, "on a host-scoped etcd root: the host whose snapshot NAME is")
	return c
}

// loadInfo reads one snapshot, its parent chain and its children in one
// read-only transaction. problem is set when the chain reaches a missing
// parent: out then holds the chain up to it.
// On a host-scoped root (scoped) it finds out whether the snapshot is a
// binding of a shared layer (out.Content), which costs a walk.
func loadInfo(ctx context.Context, ms storage.MetaStore, name string, scoped bool) (out infoJSON, problem, err error) {
	err = ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		problem = nil
		id, info, usage, err := storage.GetInfo(ctx, name)
		if err != nil {
			return err
		}
		out = infoJSON{Record: newRecord(id, info, usage)}
		seen := map[string]bool{name: true}
		for child, p := name, info.Parent; p != ""; {
			if seen[p] {
				return fmt.Errorf("snapshot %q: parent chain loops at %q (run snapmeta check)", name, p)
			}
			seen[p] = true
			pid, pinfo, _, err := storage.GetInfo(ctx, p)
			if isNotFound(err) {
				// A damaged store: the record is still worth showing.
				problem = fmt.Errorf("snapshot %q: parent %q does not exist; the parent chain ends there (see 'snapmeta check')", child, p)
				break
			}
			if err != nil {
				return fmt.Errorf("parent chain of %q: %w", name, err)
			}
			out.ParentIDs = append(out.ParentIDs, pid)
			child, p = p, pinfo.Parent
		}
		// GetInfo does not say whether it is a shared layer's binding.
		if scoped && info.Kind == snapshots.KindCommitted {
			err = storage.Walk(ctx, func(r storage.Record) error {
				out.Content = r.Content
				return nil
			}, "name=="+strconv.Quote(name))
			if err != nil {
				return err
			}
		}
		return storage.WalkInfo(ctx, func(_ context.Context, ci snapshots.Info) error {
			out.Children = append(out.Children, ci.Name)
			return nil
		}, "parent=="+strconv.Quote(name))
	})
	return out, problem, err
}

func writeInfo(w io.Writer, i infoJSON, rawBytes bool) error {
	var buf bytes.Buffer
	tw := tabwriter.NewWriter(&buf, 0, 4, 1, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("Name", i.Name)
	if i.Host != "" {
		row("Host", i.Host)
	}
	row("Kind", i.Kind.String())
	if i.Content != "" {
		row("Content", i.Content+" (a binding of a shared layer)")
	}
	row("ID", i.ID)
	row("Parent", dash(i.Parent))
	row("Parent IDs", dash(strings.Join(i.ParentIDs, " ")))
	row("Created", fmtTimeNano(i.Created))
	row("Updated", fmtTimeNano(i.Updated))
	if snapshots.Kind(i.Kind) == snapshots.KindCommitted {
		if rawBytes {
			row("Size", strconv.FormatInt(i.Usage.Size, 10))
		} else {
			row("Size", fmt.Sprintf("%s (%d bytes)", humanBytes(i.Usage.Size), i.Usage.Size))
		}
		row("Inodes", strconv.FormatInt(i.Usage.Inodes, 10))
	} else {
		row("Size", "- (known once committed)")
		row("Inodes", "-")
	}
	if len(i.Labels) == 0 {
		row("Labels", "-")
	} else {
		row("Labels", "")
		for _, k := range slices.Sorted(maps.Keys(i.Labels)) {
			fmt.Fprintf(tw, "  %s\t= %s\n", k, i.Labels[k])
		}
	}
	if len(i.Children) == 0 {
		row("Children", "-")
	} else {
		row("Children", "")
		for _, c := range i.Children {
			fmt.Fprintf(tw, "  %s\n", c)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// An empty last cell leaves padding at the end of a line.
	for _, line := range strings.SplitAfter(buf.String(), "\n") {
		if _, err := io.WriteString(w, strings.TrimRight(line, " \n")+strings.Repeat("\n", strings.Count(line, "\n"))); err != nil {
			return err
		}
	}
	return nil
}

func (a *app) treeCommand() *cobra.Command {
	var addr, host string
	var asJSON bool
	c := &cobra.Command{
		Use:   "tree [STORE]",
		Short: "Show snapshots as a parent tree",
		Long: `Show every snapshot under its parent, base layers at the left. A snapshot
whose parent is missing (a damaged store) is shown at the left, marked.

On a host-scoped etcd root each host's scope is a forest of its own, under
a line "host NAME:" (only --host's with --host); a binding of a shared
layer is marked ", shared CONTENT-KEY". --json then gives each snapshot
"host" and, for a binding, "content".`,
		Example: `  snapmeta tree --store metadata.db
  snapmeta tree --store etcd://127.0.0.1:2379/snapshots --json`,
		Args: storeArgs,
		RunE: func(c *cobra.Command, args []string) error {
			if err := a.positionalStore(c, &addr, args); err != nil {
				return err
			}
			return a.withRoot(c.Context(), addr, storeaddr.ReadOnly, host, func(v *rootView) error {
				recs, leftOut, err := a.loadRoot(c.Context(), v, nil)
				if err != nil {
					return err
				}
				if !v.scoped {
					roots, loops := forest(recs)
					if asJSON {
						enc := json.NewEncoder(a.stdout)
						enc.SetEscapeHTML(false)
						enc.SetIndent("", "  ")
						return errors.Join(enc.Encode(treeJSON(roots, loops)), leftOut)
					}
					writeTree(a.stdout, roots, loops)
					return leftOut
				}
				_, groups := byHost(recs)
				all := []*treeNode{}
				for i, s := range v.scopes {
					roots, loops := forest(groups[s.host])
					if asJSON {
						all = append(all, treeJSON(roots, loops)...)
						continue
					}
					if i > 0 {
						fmt.Fprintln(a.stdout)
					}
					fmt.Fprintf(a.stdout, "host %s:\n", s.host)
					writeTree(a.stdout, roots, loops)
				}
				if asJSON {
					enc := json.NewEncoder(a.stdout)
					enc.SetEscapeHTML(false)
					enc.SetIndent("", "  ")
					return errors.Join(enc.Encode(all), leftOut)
				}
				if len(v.scopes) == 0 {
					fmt.Fprintln(a.stdout, "(no hosts)")
				}
				return leftOut
			})
		},
	}
	storeFlag(c, &addr)
	c.Flags().BoolVar(&asJSON, "json", false, "write the forest as nested JSON")
	hostFlag(c, &host, "on a host-scoped etcd root: this host's snapshots only")
	return c
}

// nodeLabel is how tree shows one snapshot.
func nodeLabel(n *node) string {
	s := fmt.Sprintf("%s (%s, id %s", n.Name, n.Kind, n.ID)
	if snapshots.Kind(n.Kind) == snapshots.KindCommitted {
		s += ", " + humanBytes(n.Usage.Size)
	}
	if n.Content != "" {
		s += ", shared " + n.Content
	}
	s += ")"
	if n.orphan {
		s += fmt.Sprintf(" [parent %q missing]", n.Parent)
	}
	return s
}

func writeTree(w io.Writer, roots []*node, loops []Record) {
	if len(roots) == 0 && len(loops) == 0 {
		fmt.Fprintln(w, "(no snapshots)")
		return
	}
	var walk func(n *node, prefix string, last bool)
	walk = func(n *node, prefix string, last bool) {
		branch, next := "├── ", "│   "
		if last {
			branch, next = "└── ", "    "
		}
		fmt.Fprintf(w, "%s%s%s\n", prefix, branch, nodeLabel(n))
		for i, c := range n.children {
			walk(c, prefix+next, i == len(n.children)-1)
		}
	}
	for _, r := range roots {
		fmt.Fprintln(w, nodeLabel(r))
		for i, c := range r.children {
			walk(c, "", i == len(r.children)-1)
		}
	}
	for _, r := range loops {
		fmt.Fprintf(w, "%s [in a parent loop with %q]\n", nodeLabel(&node{Record: r}), r.Parent)
	}
}

// treeNode is one snapshot in tree --json.
type treeNode struct {
	Name          string      `json:"name"`
	ID            string      `json:"id"`
	Kind          Kind        `json:"kind"`
	Size          *int64      `json:"size,omitempty"`
	MissingParent string      `json:"missing_parent,omitempty"`
	InParentLoop  bool        `json:"in_parent_loop,omitempty"`
	Host          string      `json:"host,omitempty"`
	Content       string      `json:"content,omitempty"`
	Children      []*treeNode `json:"children"`
}

func treeJSON(roots []*node, loops []Record) []*treeNode {
	var conv func(n *node) *treeNode
	conv = func(n *node) *treeNode {
		t := &treeNode{Name: n.Name, ID: n.ID, Kind: n.Kind, Host: n.Host, Content: n.Content, Children: []*treeNode{}}
		if snapshots.Kind(n.Kind) == snapshots.KindCommitted {
			size := n.Usage.Size
			t.Size = &size
		}
		if n.orphan {
			t.MissingParent = n.Parent
		}
		for _, c := range n.children {
			t.Children = append(t.Children, conv(c))
		}
		return t
	}
	out := []*treeNode{}
	for _, r := range roots {
		out = append(out, conv(r))
	}
	for _, r := range loops {
		t := conv(&node{Record: r})
		t.InParentLoop = true
		out = append(out, t)
	}
	return out
}

func (a *app) idsCommand() *cobra.Command {
	var addr, host string
	var asJSON bool
	c := &cobra.Command{
		Use:   "ids [STORE]",
		Short: "Map snapshot IDs to names",
		Long: `Print every snapshot ID with the snapshot's name, in ID order. A driver names
a snapshot's directory by its ID (e.g. .../snapshots/<ID>/fs), so this is
how to tell which directory belongs to which snapshot, and which
directories belong to none.

On a host-scoped etcd root the IDs of every host's scope are listed (only
--host's with --host), with a HOST column; an ID several hosts have bound
(a shared layer) has a line per binding. --json then maps each ID to a list
of {"host": H, "name": N}.`,
		Example: `  snapmeta ids --store metadata.db
  snapmeta ids --store etcd://127.0.0.1:2379/snapshots --json`,
		Args: storeArgs,
		RunE: func(c *cobra.Command, args []string) error {
			if err := a.positionalStore(c, &addr, args); err != nil {
				return err
			}
			return a.withRoot(c.Context(), addr, storeaddr.ReadOnly, host, func(v *rootView) error {
				// Walk rather than IDMap: a damaged record leaves out only
				// itself.
				recs, leftOut, err := a.loadRoot(c.Context(), v, nil)
				if err != nil {
					return err
				}
				if v.scoped {
					return errors.Join(writeScopedIDs(a.stdout, recs, asJSON), leftOut)
				}
				m := make(map[string]string, len(recs))
				for _, r := range recs {
					m[r.ID] = r.Name
				}
				if asJSON {
					enc := json.NewEncoder(a.stdout)
					enc.SetEscapeHTML(false)
					enc.SetIndent("", "  ")
					return errors.Join(enc.Encode(m), leftOut)
				}
				ids := slices.SortedFunc(maps.Keys(m), compareIDs)
				tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tNAME")
				for _, id := range ids {
					fmt.Fprintf(tw, "%s\t%s\n", id, m[id])
				}
				return errors.Join(tw.Flush(), leftOut)
			})
		},
	}
	storeFlag(c, &addr)
	c.Flags().BoolVar(&asJSON, "json", false, "write a JSON object of ID -> name")
	hostFlag(c, &host, "on a host-scoped etcd root: this host's IDs only")
	return c
}

// compareIDs orders IDs as numbers (IDs that are not come after, as text).
func compareIDs(x, y string) int {
	nx, errX := strconv.ParseUint(x, 10, 64)
	ny, errY := strconv.ParseUint(y, 10, 64)
	if errX == nil && errY == nil {
		switch {
		case nx < ny:
			return -1
		case nx > ny:
			return 1
		}
		return 0
	}
	return strings.Compare(x, y)
}

// idHolder is one snapshot holding an ID on a host-scoped root.
type idHolder struct {
	Host string `json:"host"`
	Name string `json:"name"`
}

// writeScopedIDs writes the IDs of a host-scoped root: a line per binding
// (ID HOST NAME), or with asJSON an object of ID -> [{host, name}].
func writeScopedIDs(w io.Writer, recs []Record, asJSON bool) error {
	m := map[string][]idHolder{}
	for _, r := range recs {
		m[r.ID] = append(m[r.ID], idHolder{Host: r.Host, Name: r.Name})
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetEscapeHTML(false)
		enc.SetIndent("", "  ")
		return enc.Encode(m)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tHOST\tNAME")
	for _, id := range slices.SortedFunc(maps.Keys(m), compareIDs) {
		for _, h := range m[id] {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", id, h.Host, h.Name)
		}
	}
	return tw.Flush()
}
