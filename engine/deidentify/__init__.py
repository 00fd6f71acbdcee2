"""De-identification (PS3.15 Annex E): the Basic Application Level Confidentiality Profile
and its options, with keyed, consistent pseudonyms per research project (issue #22).

`table` holds the profile as generated from the standard's text, `profile` applies it to a
data set, `keys` derives UIDs, pseudonyms and date offsets from a project's secret,
`pseudonyms` keeps the re-identification table, `pixels` finds and blanks burned-in
annotation, `project` reads `[projects.NAME]` and puts them together.
"""
