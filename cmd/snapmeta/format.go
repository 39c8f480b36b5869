package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"text/tabwriter"
	"text/template"
	"time"
	"unicode/utf8"

	"golang.org/x/term"
)

// formatHelp documents --format's templates, for the help of ls.
const formatHelp = `--format takes, besides table and json, a Go template (text/template), as
docker and ctr do: '{{.Name}} {{.ID}}' writes one line per snapshot;
'table {{.Name}}\t{{.Kind}}' writes a table, columns apart at each \t,
under headers made of the field names in capitals (NAME KIND). \t and \n
in the template stand for a tab and a newline. The fields are those of the
JSON output: .Name, .ID, .Kind (active, view or committed), .Parent (""
for none), .Labels (a map: {{index .Labels "key"}}), .Created and .Updated
(time.Time), .Usage.Size and .Usage.Inodes (bytes and inodes; 0 unless
committed), .Host (the host scope on a host-scoped etcd root, "" elsewhere)
and .Content (the content key of a binding of a shared layer, "" for any
other snapshot). Functions: json (the value as JSON), join (join LIST SEP), size
(bytes in KiB, MiB, ...). A template that does not parse, or names a field
that does not exist, is a usage error.`

// templateFuncs are the functions --format templates may call.
var templateFuncs = template.FuncMap{
	"json": func(v any) (string, error) {
		b, err := json.Marshal(v)
		return string(b), err
	},
	"join": strings.Join,
	"size": humanBytes,
}

// listFormat is how ls writes records: a built-in format, or a template.
type listFormat struct {
	name  string             // "table", "json" or "template"
	tmpl  *template.Template // for "template"
	table bool               // a "table ..." template: cells apart at tabs
	heads []string           // its headers
}

// parseFormat reads --format: table, json, a template, or "table "
// followed by a template. A template that does not parse or does not run
// on sample (what it will be given: a Record for ls) is a usage error.
func parseFormat(s string, sample any) (listFormat, error) {
	switch s {
	case "table", "json":
		return listFormat{name: s}, nil
	case "":
		return listFormat{}, usageErrorf("--format must be table, json or a Go template, not empty")
	}
	if !strings.Contains(s, "{{") {
		// A template without an action writes the same text for every
		// snapshot: surely a mistyped format.
		return listFormat{}, usageErrorf("--format must be table, json or a Go template ({{.Name}} ...), not %q", s)
	}
	f := listFormat{name: "template"}
	text := s
	if rest, ok := strings.CutPrefix(s, "table "); ok {
		f.table, text = true, rest
	}
	text = strings.NewReplacer(`\t`, "\t", `\n`, "\n").Replace(text)
	tmpl, err := template.New("--format").Option("missingkey=zero").Funcs(templateFuncs).Parse(text)
	if err != nil {
		return f, usageErrorf("--format: %v", err)
	}
	if err := tmpl.Execute(io.Discard, sample); err != nil {
		return f, usageErrorf("--format: %v", err)
	}
	f.tmpl = tmpl
	if f.table {
		for _, col := range strings.Split(text, "\t") {
			f.heads = append(f.heads, columnHeader(col))
		}
	}
	return f, nil
}

var (
	actionRE = regexp.MustCompile(`{{(.*?)}}`)
	fieldRE  = regexp.MustCompile(`(?:^|[\s(|])\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`)
)

// sampleRecord is a record to try a template on.
var sampleRecord = Record{Name: "n", ID: "1", Labels: map[string]string{}, Created: time.Unix(0, 0), Updated: time.Unix(0, 0)}

// columnHeader is the header of one column of a table template: the last
// part of each field it names, in capitals ({{.Usage.Size}}: SIZE).
func columnHeader(col string) string {
	var words []string
	for _, a := range actionRE.FindAllStringSubmatch(col, -1) {
		for _, m := range fieldRE.FindAllStringSubmatch(a[1], -1) {
			parts := strings.Split(m[1], ".")
			words = append(words, strings.ToUpper(parts[len(parts)-1]))
		}
	}
	return strings.Join(words, " ")
}

// writeTemplate writes recs (each a Record, or what the template was tried
// on) through a template format: a line each, or a table fitted to width
// (0: no limit).
func writeTemplate[T any](w io.Writer, f listFormat, recs []T, header bool, width int) error {
	if !f.table {
		bw := bufio.NewWriter(w)
		for _, r := range recs {
			if err := f.tmpl.Execute(bw, r); err != nil {
				return err
			}
			bw.WriteByte('\n')
		}
		return bw.Flush()
	}
	var rows [][]string
	if header {
		rows = append(rows, f.heads)
	}
	var b strings.Builder
	for _, r := range recs {
		b.Reset()
		if err := f.tmpl.Execute(&b, r); err != nil {
			return err
		}
		rows = append(rows, strings.Split(b.String(), "\t"))
	}
	return writeRows(w, rows, width, nil)
}

// writeRows writes rows as a table, two spaces between columns, with the
// widest of the shrinkable columns (all when shrink is nil) cut to fit
// width (0: no limit).
func writeRows(w io.Writer, rows [][]string, width int, shrink []bool) error {
	if width > 0 {
		fitColumns(rows, width, shrink)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, row := range rows {
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	return tw.Flush()
}

// minColumn is the narrowest fitColumns cuts a column to.
const minColumn = 8

// fitColumns cuts cells, ending them with "…", so that each row fits width
// with two spaces between columns: it narrows the widest shrinkable column
// (all when shrink is nil) one character at a time, none below minColumn.
// A row that cannot fit so is left wider.
func fitColumns(rows [][]string, width int, shrink []bool) {
	var widths []int
	for _, row := range rows {
		for i, cell := range row {
			if i >= len(widths) {
				widths = append(widths, 0)
			}
			widths[i] = max(widths[i], utf8.RuneCountInString(cell))
		}
	}
	if len(widths) == 0 {
		return
	}
	total := 2 * (len(widths) - 1)
	for _, cw := range widths {
		total += cw
	}
	canShrink := func(i int) bool { return shrink == nil || (i < len(shrink) && shrink[i]) }
	for total > width {
		j := -1
		for i, cw := range widths {
			if canShrink(i) && cw > minColumn && (j < 0 || cw > widths[j]) {
				j = i
			}
		}
		if j < 0 {
			break
		}
		widths[j]--
		total--
	}
	for _, row := range rows {
		for i, cell := range row {
			if utf8.RuneCountInString(cell) > widths[i] {
				row[i] = string([]rune(cell)[:widths[i]-1]) + "…"
			}
		}
	}
}

// terminalWidth is the width to fit a table written to w: 0 (no limit)
// unless w is a terminal, then $COLUMNS when it is a positive number, else
// the terminal's own width.
func terminalWidth(w io.Writer) int {
	if !isTerminal(w) {
		return 0
	}
	if n, err := strconv.Atoi(os.Getenv("COLUMNS")); err == nil && n > 0 {
		return n
	}
	if f, ok := w.(*os.File); ok {
		if n, _, err := term.GetSize(int(f.Fd())); err == nil && n > 0 {
			return n
		}
	}
	return 0
}
